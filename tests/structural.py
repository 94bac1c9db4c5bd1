"""A checkpoint shaped like the real Llama 3.2 Vision, narrow enough for a CPU: the fidelity tests'.

The tiny checkpoint (:mod:`tiny` (tests/tiny.py)) keeps the serving tests fast, but its vision tower
has one intermediate layer and near-identity random layers, so it cannot tell Meta's features from a
library's bug. This one keeps every structural feature of the real 11B/90B configs, at small widths:

* **vision**: 560-pixel tiles of 14-pixel patches (1,601 positions a tile, as real: encoder lengths,
  caches and length limits meet real sizes), up to 4 tiles with the real aspect ratios, a tower of 8
  local layers with **5 intermediate layers at spread positions, the last one not listed** (real: 32 layers, ``[3, 7, 15, 23, 30]``),
  **2 gated global layers** (real: 8), layers initialised at the scale trained ones work at (each
  changes the residual stream by about its own size, unlike a random init's near-identity), open gates;
* **text**: 10 layers with cross-attention at ``[3, 8]``, where Meta's fusion schedule puts them (the
  first two of 11B's ``[3, 8, 13, …, 38]``), grouped-query attention, **llama3 RoPE scaling with the
  real parameters** and the real 131,072-token context;
* the tile embeddings of padding tiles are zero, as in Meta's converted repositories
  (:func:`tiny.build`, tests/tiny.py, does that for every test checkpoint).

The output head is sharpened so greedy answers are far from ties (tests check the gaps).
"""

from __future__ import annotations

import math
import os

#: Meta's llama3 RoPE scaling, as in the real configs.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TEXT = dict(
    vocab_size=128256, hidden_size=128, intermediate_size=256, num_hidden_layers=10, num_attention_heads=4,
    num_key_value_heads=2, cross_attention_layers=[3, 8], max_position_embeddings=131072,
    rope_parameters=LLAMA3_ROPE,
)
VISION = dict(
    hidden_size=32, intermediate_size=128, num_hidden_layers=8, num_global_layers=2, attention_heads=2,
    intermediate_layers_indices=[1, 2, 4, 5, 6], vision_output_dim=32 * 6, image_size=560, patch_size=14,
    max_num_tiles=4,
)
HEAD_SCALE = 40.0
SEED = 2


def build(out_dir: str, seed: int = SEED) -> str:
    """Write the structural checkpoint to ``out_dir`` (model, the real tokenizer, processor). Every
    weight is drawn here, in name order, from one seeded generator: the same checkpoint whatever
    transformers builds it (the vLLM stages' 4.x and the main run's 5.x)."""
    from tiny import build as build_tiny

    return build_tiny(out_dir, text=TEXT, vision=VISION, head_scale=HEAD_SCALE,
                      init=lambda model: _init(model, seed))


def _init(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            continue  # layer and RMS norms: ones and zeros, as initialised
        draw = torch.randn(param.shape, generator=generator)
        if name.endswith(("gate_attn", "gate_ffn", ".gate")):
            param.copy_(0.6 + 0.6 * torch.rand(param.shape, generator=generator))  # trained gates are open
        elif param.dim() >= 2 and "embed" not in name:
            # linear and patch weights at the scale trained layers work at: each sublayer's output
            # about as large as its input, so every layer (and every image) matters
            param.copy_(draw / math.sqrt(param[0].numel()))
        elif "embed_tokens" in name:
            param.copy_(draw)
        else:
            param.copy_(draw * 0.02)
