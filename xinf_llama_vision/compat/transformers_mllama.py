"""transformers' Mllama, brought to Meta's architecture for the models the Transformers engine loads.

For: transformers >= 4.52 (the engine's ``model.model`` layout); measured on 4.53.2 and 5.17.0 (see
docs/fidelity.md). Two places where transformers computes something else than Meta's reference
(llama-models), both found by the fidelity tests on a checkpoint shaped like the real ones:

* :data:`INTERMEDIATE`: the projector must see the **input** of each block listed in
  ``intermediate_layers_indices``. transformers up to 4.53 records it; 4.55 recorded the last state for
  every listed layer; 4.57 to 5.23 record each block's **output** (one layer late).
* :data:`BLIND_ROWS`: a token that sees no image (text before the first ``<|image|>``) must get nothing
  from a cross-attention layer. Meta multiplies the attention output and the MLP by the row's "sees an
  image" flag; transformers multiplies only the MLP, so those tokens attend to every tile of the
  request's images (4.53 and 5.17 alike).

Nothing changes for other models: :func:`meta_mllama` patches one model *instance* (its vision
encoder's ``forward``, hooks on its cross-attention layers), never transformers' classes, and only for
what the installed transformers gets wrong. That is decided by behaviour (:func:`deviations`: a
tiny random Mllama of the installed transformers, probed once per process), so a transformers that
fixes either turns the patch off by itself; a transformers whose Mllama changed so much that a patched
probe still disagrees with Meta's rules refuses to load, naming its version.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Tuple

import torch

logger = logging.getLogger("xinference.model.llm.xinf_llama_vision")

INTERMEDIATE = "intermediate vision layers: the input of each listed block"
BLIND_ROWS = "tokens that see no image: nothing from the cross-attention layers"


def meta_mllama(model) -> Tuple[str, ...]:
    """Make a loaded ``MllamaForConditionalGeneration`` compute Meta's architecture where the installed
    transformers does not (idempotent); returns what was changed (:data:`INTERMEDIATE`, :data:`BLIND_ROWS`)."""
    fixes = deviations()
    if getattr(model, "_xlv_meta", None) is None:
        _apply(model, fixes)
        model._xlv_meta = fixes
    return fixes


@functools.lru_cache(maxsize=1)
def deviations() -> Tuple[str, ...]:
    """What the installed transformers' Mllama computes unlike Meta's architecture, measured on a tiny
    random model; checked again after patching one (a ``RuntimeError`` names the version if the patch
    does not hold there)."""
    import transformers

    found = tuple(name for name, holds in _probes(_probe_model()) if not holds)
    if found:
        patched = _probe_model()
        _apply(patched[0], found)
        still = [name for name, holds in _probes(patched) if not holds]
        if still:
            raise RuntimeError(
                f"transformers {transformers.__version__}: Llama 3.2 Vision's {'; '.join(still)} could not be "
                "brought to Meta's architecture (its Mllama changed); use a transformers version from "
                "docs/fidelity.md")
        logger.info("transformers %s: serving Llama 3.2 Vision with Meta's %s", transformers.__version__,
                    " and ".join(found))
    return found


def _apply(model, fixes) -> None:
    if INTERMEDIATE in fixes:
        encoder = model.model.vision_model.transformer
        encoder.forward = types.MethodType(_forward_keeping_block_inputs, encoder)
    if BLIND_ROWS in fixes:
        text = model.model.language_model
        for index in model.config.text_config.cross_attention_layers:
            _zero_blind_rows(text.layers[index])


# -- the patches -------------------------------------------------------------------------------


def _forward_keeping_block_inputs(self, hidden_states, attention_mask=None, **kwargs):
    """A vision encoder's forward whose ``hidden_states[i]`` is the input of block ``i`` (Meta's
    ``ImageTransformer`` with ``return_intermediate``)."""
    from transformers.modeling_outputs import BaseModelOutput

    inputs = []
    for layer in self.layers:
        inputs.append(hidden_states)
        out = layer(hidden_states, attention_mask=attention_mask)
        hidden_states = out[0] if isinstance(out, tuple) else out
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(inputs))


def _zero_blind_rows(layer) -> None:
    """Multiply a cross-attention decoder layer's attention output by each token's "sees an image" flag
    (``full_text_row_masked_out_mask``, which transformers applies to the MLP only)."""

    def remember(module, args, kwargs):
        rows = kwargs.get("full_text_row_masked_out_mask", args[4] if len(args) > 4 else None)
        module._xlv_rows = rows

    def zero(module, args, output):
        rows = getattr(layer, "_xlv_rows", None)
        if rows is None:
            return output
        attended = output[0] if isinstance(output, tuple) else output
        attended = attended * rows[:, 0].to(attended.device, attended.dtype)
        return (attended, *output[1:]) if isinstance(output, tuple) else attended

    layer.register_forward_pre_hook(remember, with_kwargs=True)
    layer.cross_attn.register_forward_hook(zero)


# -- the probes --------------------------------------------------------------------------------


def _probe_model():
    """A tiny random Mllama of the installed transformers (gates open), the global RNG left as it was."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_global_layers=1, attention_heads=2,
                  intermediate_layers_indices=[1], vision_output_dim=32, image_size=28, patch_size=14)
    text = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_theta=10000.0,
                rope_scaling={"rope_type": "default"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MllamaForConditionalGeneration(
            MllamaConfig(vision_config=vision, text_config=text, image_token_index=15)).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(1.0)
        images = [torch.randn(1, 1, 4, 3, 28, 28) for _ in range(2)]
    return model, images


@torch.no_grad()
def _probes(probe):
    model, images = probe
    ratio_ids, ratio_mask = torch.tensor([[1]]), torch.tensor([[[1, 0, 0, 0]]])
    vision = model.model.vision_model
    seen = {}

    def grab(module, args, kwargs):
        seen["input"] = args[0] if args else kwargs.get("hidden_states", kwargs.get("hidden_state"))

    hook = vision.transformer.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = vision(pixel_values=images[0], aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask)
    finally:
        hook.remove()
    states = out[0]
    width, positions = vision.hidden_size, states.shape[-2]
    block_input = seen["input"].reshape(states.shape[:3] + (-1, width))[..., :positions, :]
    yield INTERMEDIATE, torch.allclose(states[..., width:], block_input, atol=1e-6)

    # Tokens 0 and 1 come before the image: Meta's model gives them the same states whatever the image.
    ids = torch.tensor([[1, 2, 15, 3]])
    mask = torch.tensor([[[[0, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[1, 0, 0, 0]]]])
    before = [model.model(input_ids=ids, pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
                          cross_attention_mask=mask).last_hidden_state[0, :2] for pixels in images]
    yield BLIND_ROWS, torch.allclose(before[0], before[1], atol=1e-6)
