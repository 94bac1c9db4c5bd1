"""How much GPU memory a Llama 3.2 Vision launch needs, from its architecture, and whether it fits.

    xinf-llama-vision estimate --size 90 --quantization 4-bit --context-length 8192 --max-num-seqs 16

The estimate adds up:

* **weights**, counted layer by layer from the architecture (:func:`parameters` equals
  ``sum(p.numel())`` of the model exactly), each group at its method's bytes
  (:mod:`.quantization`: the text decoder's ``Linear`` layers quantized, the rest 16-bit);
* the **self-attention KV cache**: every self-attention layer, ``context_length`` tokens per sequence;
* the **cross-attention cache**: every cross-attention layer keeps the K/V of each image's tokens
  (4 tiles x 1601 tokens at 560 px), per sequence, for its whole life;
* **activation headroom**: one prefill chunk through the widest layers, the vision tower on one
  request's images, the logits of every sequence, and a fixed runtime reserve (CUDA context,
  allocator slack).

>>> e = estimate(ARCHITECTURES[90], "none", context_length=8192, max_num_seqs=1)
>>> round(e.weights / 1e9, 1), round(e.total / 1e9, 1)
(177.2, 182.9)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import DoesNotFit
from .quantization import METHODS

GB = 1e9
#: The GPU memory classes of the model card's "GPUs that can run this model" (GB).
GPU_CLASSES: Tuple[int, ...] = (24, 48, 80, 94, 141)
#: Share of a GPU's memory a launch may plan for (vLLM's default ``gpu_memory_utilization``).
USABLE = 0.9
#: GPU counts a launch can split over (the tensor-parallel size divides the 8 KV heads).
GPU_COUNTS: Tuple[int, ...] = (1, 2, 4, 8)
#: CUDA context, cuBLAS workspaces and allocator slack, per launch.
RUNTIME_RESERVE = 1 << 30


def tile_tokens(image_size: int, patch_size: int) -> int:
    """Image tokens one tile gives every cross-attention layer: its patches and a class token.

    >>> tile_tokens(560, 14), tile_tokens(112, 14)
    (1601, 65)
    """
    return (image_size // patch_size) ** 2 + 1


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide Mllama's parameter count and cache sizes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    cross_attention_layers: Tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_global_layers: int
    vision_output_dim: int
    image_size: int
    patch_size: int
    max_num_tiles: int
    num_aspect_ratios: int
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_tile(self) -> int:
        """:func:`tile_tokens` of this architecture.

        >>> ARCHITECTURES[11].tokens_per_tile
        1601
        """
        return tile_tokens(self.image_size, self.patch_size)

    @classmethod
    def from_config(cls, config: Mapping) -> "Architecture":
        """From a checkpoint's ``config.json`` (an ``MllamaConfig`` as a dict)."""
        text, vision = config["text_config"], config["vision_config"]
        return cls(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
            cross_attention_layers=tuple(text["cross_attention_layers"]),
            num_attention_heads=text["num_attention_heads"], num_key_value_heads=text["num_key_value_heads"],
            vision_hidden_size=vision["hidden_size"], vision_intermediate_size=vision["intermediate_size"],
            vision_layers=vision["num_hidden_layers"], vision_global_layers=vision["num_global_layers"],
            vision_output_dim=vision["vision_output_dim"], image_size=vision["image_size"],
            patch_size=vision["patch_size"], max_num_tiles=vision["max_num_tiles"],
            num_aspect_ratios=len(vision["supported_aspect_ratios"]), num_channels=vision.get("num_channels", 3),
        )

    @classmethod
    def from_checkpoint(cls, path: str) -> "Architecture":
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_config(json.load(f))


def _released(hidden: int, intermediate: int, layers: int, cross_every: int, heads: int) -> Architecture:
    return Architecture(
        vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        cross_attention_layers=tuple(range(3, layers, cross_every)), num_attention_heads=heads,
        num_key_value_heads=8, vision_hidden_size=1280, vision_intermediate_size=5120, vision_layers=32,
        vision_global_layers=8, vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4,
        num_aspect_ratios=8,
    )


#: Meta's released shapes (``config.json`` of meta-llama/Llama-3.2-{11,90}B-Vision{,-Instruct}).
ARCHITECTURES: Dict[int, Architecture] = {
    11: _released(4096, 14336, 40, 5, 32),
    90: _released(8192, 28672, 100, 5, 64),
}


def parameters(arch: Architecture) -> Dict[str, int]:
    """Parameters per group; ``"quantized"`` is what a quantization method stores at its bytes
    (the text decoder's ``Linear`` weights), the others stay 16-bit.

    >>> p = parameters(ARCHITECTURES[90])
    >>> round(sum(p.values()) / 1e9, 2), round(p["quantized"] / sum(p.values()), 3)
    (88.59, 0.966)
    """
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    kv = arch.num_key_value_heads * d
    cross = len(arch.cross_attention_layers)
    attention = 2 * h * h + 2 * h * kv  # q, o; k, v (no biases)
    mlp = 3 * h * i  # gate, up, down
    v, vi, c = arch.vision_hidden_size, arch.vision_intermediate_size, arch.num_channels
    patches = arch.tokens_per_tile
    tiles = arch.num_aspect_ratios + 1  # the aspect-ratio embeddings have a row for "none"
    vision_layer = 4 * v * v + 2 * v * vi + vi + v + 4 * v  # attention, MLP with biases, 2 LayerNorms
    return {
        "quantized": arch.num_hidden_layers * (attention + mlp),
        "text_norms": arch.num_hidden_layers * 2 * h + cross * (2 * d + 2) + h,  # + q/k norms, gates; final
        "embed_tokens": (arch.vocab_size + 8) * h,  # 8 extra rows: <|image|> and reserved tokens
        "lm_head": arch.vocab_size * h,
        "projector": arch.vision_output_dim * h + h,
        "vision_tower": (
            (arch.vision_layers + arch.vision_global_layers) * vision_layer + 2 * arch.vision_global_layers
            + v * c * arch.patch_size ** 2 + v  # patch embedding, class embedding
            + 1 + patches * v + tiles * arch.max_num_tiles * patches * v  # gated positional embedding
            + 2 * (1 + tiles * arch.max_num_tiles * v)  # pre- and post-tile embeddings
            + 4 * v  # LayerNorms before and after
        ),
    }


def kv_bytes_per_token(arch: Architecture, dtype_bytes: int = 2) -> int:
    """Bytes one text token adds to the cache: K and V of every self-attention layer.

    >>> kv_bytes_per_token(ARCHITECTURES[11])  # 32 self-attention layers x K, V x 8 heads x 128 x bf16
    131072
    """
    self_layers = arch.num_hidden_layers - len(arch.cross_attention_layers)
    return self_layers * 2 * arch.num_key_value_heads * arch.head_dim * dtype_bytes


def image_kv_bytes_per_token(arch: Architecture, dtype_bytes: int = 2) -> int:
    """Bytes one image token (a patch of a tile, or its class token) holds: K and V of every
    cross-attention layer."""
    return len(arch.cross_attention_layers) * 2 * arch.num_key_value_heads * arch.head_dim * dtype_bytes


def image_tokens(arch: Architecture, images: int = 1) -> int:
    """Cross-attention keys of ``images`` images: the processor pads every image to ``max_num_tiles``.

    >>> image_tokens(ARCHITECTURES[11])
    6404
    """
    return images * arch.max_num_tiles * arch.tokens_per_tile


def cache_bytes(arch: Architecture, rows: int, width: int, image_width: int = 0, dtype_bytes: int = 2) -> int:
    """A batch's cache: ``rows`` rows padded to ``width`` text tokens and ``image_width`` image tokens
    (the Transformers engine pads every row to the longest; vLLM's paged cache holds
    ``rows x width`` for ``rows`` sequences of ``width`` tokens the same way).

    >>> round(cache_bytes(ARCHITECTURES[11], 1, 131072) / 1e9, 1)  # one sequence at the full context
    17.2
    """
    return rows * (width * kv_bytes_per_token(arch, dtype_bytes)
                   + image_width * image_kv_bytes_per_token(arch, dtype_bytes))


def quantized_rows(arch: Architecture) -> int:
    """Output rows of the quantized layers (per-row scales)."""
    kv = arch.num_key_value_heads * arch.head_dim
    return arch.num_hidden_layers * (2 * arch.hidden_size + 2 * kv + 2 * arch.intermediate_size + arch.hidden_size)


@dataclass(frozen=True)
class Estimate:
    """Bytes a launch needs, by part."""

    weights: int
    kv_cache: int
    cross_cache: int
    activations: int
    inputs: Dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.cross_cache + self.activations

    def gpus(self, usable: float = USABLE) -> Dict[int, Optional[int]]:
        """For each GPU class (GB), the fewest GPUs of it that hold this launch, or ``None``."""
        return {
            size: next((n for n in GPU_COUNTS if self.total / n <= usable * size * GB), None)
            for size in GPU_CLASSES
        }


def activation_bytes(arch: Architecture, prefill_tokens: int, images: int, rows: int, dtype_bytes: int = 2) -> int:
    """Room for one forward pass beside the weights and the cache: a prefill of ``prefill_tokens``
    through the widest text layers, or the vision tower on ``images`` images (whichever is more; they
    run one after the other), the float32 logits of ``rows`` rows, and the runtime's reserve."""
    text = prefill_tokens * (4 * arch.hidden_size + 2 * arch.intermediate_size) * dtype_bytes
    vision = image_tokens(arch, images) * (4 * arch.vision_hidden_size + 2 * arch.vision_intermediate_size
                                           + arch.vision_output_dim) * dtype_bytes
    return max(text, vision) + rows * arch.vocab_size * 4 + RUNTIME_RESERVE


def estimate(arch: Architecture, quantization: str = "none", context_length: int = 8192, max_num_seqs: int = 1,
             images_per_seq: int = 1, dtype_bytes: int = 2, prefill_tokens: int = 8192,
             rebuild_room: bool = False) -> Estimate:
    """The memory one launch needs (see the module's docstring for what is counted); ``rebuild_room``:
    the Transformers engine's, whose batch of two or more rows keeps as much again free for the copy
    it makes when rows join or leave.

    >>> estimate(ARCHITECTURES[11], "bogus")
    Traceback (most recent call last):
    ...
    ValueError: unknown quantization 'bogus': one of none, 8-bit, 4-bit, FP8
    """
    if quantization not in METHODS:
        raise ValueError(f"unknown quantization {quantization!r}: one of {', '.join(METHODS)}")
    method = METHODS[quantization]
    groups = parameters(arch)
    kept = sum(n for name, n in groups.items() if name != "quantized")
    if quantization == "none":
        weights = sum(groups.values()) * dtype_bytes
    else:
        weights = kept * dtype_bytes + math.ceil(groups["quantized"] * method.bytes_per_weight) \
            + quantized_rows(arch) * method.bytes_per_row
    kv_cache = cache_bytes(arch, max_num_seqs, context_length, 0, dtype_bytes)
    cross_cache = cache_bytes(arch, max_num_seqs, 0, image_tokens(arch, images_per_seq), dtype_bytes)
    if rebuild_room and max_num_seqs > 1:  # the Transformers engine's batch rebuilds (engines/transformers/admission.py)
        kv_cache, cross_cache = 2 * kv_cache, 2 * cross_cache
    activations = activation_bytes(arch, min(prefill_tokens, context_length), images_per_seq, max_num_seqs,
                                   dtype_bytes)
    return Estimate(weights, kv_cache, cross_cache, activations, {
        "quantization": quantization, "context_length": context_length, "max_num_seqs": max_num_seqs,
        "images_per_seq": images_per_seq, "dtype_bytes": dtype_bytes, "rebuild_room": rebuild_room,
    })


def report(size: int, e: Estimate) -> str:
    """What ``xinf-llama-vision estimate`` prints."""
    lines = [
        f"Llama 3.2 Vision {size}B, quantization {e.inputs['quantization']}, context {e.inputs['context_length']}, "
        f"{e.inputs['max_num_seqs']} sequences, {e.inputs['images_per_seq']} image(s) each"
        + (", with the Transformers engine's rebuild room" if e.inputs.get("rebuild_room") else ""),
        f"  weights          {e.weights / GB:8.1f} GB",
        f"  KV cache         {e.kv_cache / GB:8.1f} GB",
        f"  image cache      {e.cross_cache / GB:8.1f} GB",
        f"  activations      {e.activations / GB:8.1f} GB",
        f"  total            {e.total / GB:8.1f} GB",
        f"GPUs that can run this (planning for {USABLE:.0%} of each):",
    ]
    for gb, n in e.gpus().items():
        lines.append(f"  {gb:>4} GB: " + (f"{n} GPU{'s' if n > 1 else ''} (--n-gpu {n})" if n else "more than 8 GPUs"))
    return "\n".join(lines)


def check_fit(arch: Architecture, need: Estimate, free: Sequence[int], quantizations: Sequence[str],
              option: str = "--skip_memory_check true", context_option: str = "--max_model_len") -> None:
    """Raise :class:`DoesNotFit` when ``need`` exceeds the free memory of the launch's GPUs
    (``free``: bytes per GPU, as ``torch.cuda.mem_get_info`` reports), naming launches that fit
    (a shorter context by the engine's own option: ``--max_model_len`` on vLLM, ``--context_length``
    on the Transformers engine).

    >>> arch = ARCHITECTURES[90]
    >>> check_fit(arch, estimate(arch, "none"), [80 * GB], ["none", "8-bit", "4-bit"])
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.DoesNotFit: this launch needs about 182.9 GB of GPU memory and 1 GPU has 80.0 GB free. Launches that would fit: --quantization 4-bit, --n-gpu 4 (GPUs like these). Or skip this check: --skip_memory_check true
    """
    have = sum(free)
    if need.total <= have:
        return
    inputs = dict(need.inputs)

    def fits(**change) -> bool:
        return estimate(arch, **{**inputs, **change}).total <= have

    ideas: List[str] = [f"--quantization {q}" for q in quantizations if q != inputs["quantization"] and fits(quantization=q)]
    per_gpu = min(free) if free else 0
    more = next((n for n in GPU_COUNTS if n > len(free) and need.total <= n * per_gpu), None)
    if more is not None:
        ideas.append(f"--n-gpu {more} (GPUs like these)")
    context = inputs["context_length"]
    while context > 1024 and not fits(context_length=context):
        context //= 2
    if context < inputs["context_length"] and fits(context_length=context):
        ideas.append(f"{context_option} {context}")
    seqs = inputs["max_num_seqs"]
    while seqs > 1 and not fits(max_num_seqs=seqs):
        seqs //= 2
    if seqs < inputs["max_num_seqs"] and fits(max_num_seqs=seqs):
        ideas.append(f"--max_num_seqs {seqs}")
    gpus = f"{len(free)} GPU{'s' if len(free) != 1 else ''} {'has' if len(free) == 1 else 'have'}"
    raise DoesNotFit(
        f"this launch needs about {need.total / GB:.1f} GB of GPU memory and {gpus} {have / GB:.1f} GB free. "
        + (f"Launches that would fit: {', '.join(ideas)}. " if ideas else "No smaller launch of this model fits. ")
        + f"Or skip this check: {option}"
    )
