"""Llama 3.2 Vision as Meta's architecture computes it: the fidelity tests' oracle.

Test-only, and independent of what it judges: plain torch on a checkpoint's weights, no transformers
model, no vLLM, nothing of ``xinf_llama_vision``. Written from Meta's reference (llama-models,
``models/llama3/multimodal/model.py``: ``VisionEncoder``, ``ImageTransformer``, ``CrossAttention``,
``CrossAttentionTransformerBlock``; ``encoder_utils``; ``create_vision_mask``), for checkpoints in the
layout Meta's Hugging Face repositories ship. Float32, no cache: each step recomputes the whole
sequence, which keeps it short and plainly right.

What Meta's architecture says, and what this module does (each a place where an engine can go wrong):

* **Intermediate vision layers**: the projector sees the final state of the global tower, then the
  *input* of each block listed in ``intermediate_layers_indices``, stacked on the last axis (channel
  ``c`` of the ``k``-th listed layer at ``c * K + k``).
* **Tile embeddings** are added to an image's real tiles only (padding tiles get none).
* **Vision attention mask**: a position is hidden from another only when both are padding (padding
  tiles, or the positions that round a tile up to a multiple of 8).
* **Which image each token sees** (``create_vision_mask``): image ``k`` is seen from its own
  ``<|image|>`` token up to the next image's token; in a run of adjacent ``<|image|>`` tokens each
  image is seen as far as the run's last one; the last image to the end of the sequence.
* **Tokens that see no image** (text before the first image) get nothing from a cross-attention layer:
  Meta multiplies both the attention output and the MLP by the row's "sees an image" flag.
* A prompt **without images** skips the cross-attention layers.

Form, not meaning, differs from the checkpoint's layout in two places: Meta rotates interleaved pairs
of q/k channels (complex numbers), the Hugging Face layout stores q/k rows permuted for rotate-half
(undone here, then rotated as Meta does); Meta's patch embedding is unfold + linear (the
checkpoint's conv weight, flattened).

Meta's own generation code computes the image spans once, on the prompt: with one image the last
span runs to the end (``-1``), with several it stops at the prompt's end, so generated tokens would
see no image, unlike the training sequences the spans describe (answer tokens included). This
reference computes the spans on the whole sequence so far, as in training: generated tokens see the
prompt's last image group (transformers and vLLM do the same).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F


def vision_spans(tokens: Sequence[int], image_token: int) -> List[List[int]]:
    """``[start, end)`` of the tokens that see each image, in image order (Meta's ``create_vision_mask``).

    >>> vision_spans([1, 9, 2, 9, 3], 9)  # text between: each image until the next
    [[1, 3], [3, 5]]
    >>> vision_spans([1, 9, 9, 2], 9)  # adjacent: the first starts at its own token
    [[1, 4], [2, 4]]
    >>> vision_spans([9, 2], 9), vision_spans([1, 2], 9)
    ([[0, 2]], [])
    """
    where = [i for i, t in enumerate(tokens) if t == image_token]
    spans = [[start, end] for start, end in zip(where, where[1:] + [len(tokens)])]
    for k in range(len(spans) - 2, -1, -1):
        if spans[k][1] == spans[k][0] + 1:  # the next token is an image too: see as far as it does
            spans[k][1] = spans[k + 1][1]
    return spans


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from the Hugging Face layout (rotate-half) back to Meta's (interleaved pairs)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """Meta's rotary frequencies, llama3-scaled where the config says so."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.get("rope_type") != "llama3":
        return freqs
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < old / high:
            out.append(f)
        elif wavelength > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Meta's ``apply_rotary_emb``: consecutive channel pairs as complex numbers, times ``e^{i·angle}``."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(turned).reshape(x.shape).to(x.dtype)


class MetaMllama:
    """Meta's Llama 3.2 Vision over a checkpoint directory (``config.json`` + safetensors)."""

    def __init__(self, path: str):
        from safetensors.torch import load_file

        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        self.text, self.vision = config["text_config"], config["vision_config"]
        self.image_token = config["image_token_index"]
        self.w: Dict[str, torch.Tensor] = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                for key, tensor in load_file(os.path.join(path, name)).items():
                    self.w[_short(key)] = tensor.float()
        t = self.text
        self.head_dim = t["hidden_size"] // t["num_attention_heads"]
        rope = t.get("rope_parameters") or dict(t.get("rope_scaling") or {}, rope_theta=t["rope_theta"])
        self.freqs = rope_frequencies(self.head_dim, rope)
        for i in range(t["num_hidden_layers"]):
            if i not in t["cross_attention_layers"]:
                p = f"text.layers.{i}.self_attn."
                self.w[p + "q_proj.weight"] = _unpermute(self.w[p + "q_proj.weight"], t["num_attention_heads"])
                self.w[p + "k_proj.weight"] = _unpermute(self.w[p + "k_proj.weight"], t["num_key_value_heads"])

    # -- vision ------------------------------------------------------------------------------
    @torch.no_grad()
    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """The image processor's tensors (a batch of prompts' images) → what the projector reads,
        ``(batch, images, tiles, positions, width·(K+1))``."""
        return torch.stack([
            torch.stack([self.encode(pixels.float(), int(ratio), int(mask.sum()))
                         for pixels, ratio, mask in zip(*prompt)])
            for prompt in zip(pixel_values, aspect_ratio_ids, aspect_ratio_mask)])

    def image_features(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """One prompt's images (batch of 1) → the projector's output, ``(images, tiles, positions, text hidden)``."""
        states = self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)[0]
        return states @ self.w["projector.weight"].T + self.w["projector.bias"]

    def encode(self, pixels: torch.Tensor, ratio_id: int, real_tiles: int) -> torch.Tensor:
        """``VisionEncoder.forward`` for one image: ``(tiles, 3, H, W)`` → ``(tiles, positions, width·(K+1))``."""
        v, w = self.vision, self.w
        patch, width, tiles = v["patch_size"], v["hidden_size"], v["max_num_tiles"]
        conv = w["vision.patch_embedding.weight"].reshape(width, -1)
        x = F.unfold(pixels, kernel_size=patch, stride=patch).transpose(1, 2) @ conv.T  # (tiles, grid², width)
        x = self._tile_embedding(x, "pre_tile_positional_embedding", ratio_id, real_tiles)
        cls = w["vision.class_embedding"].expand(tiles, 1, width)
        x = torch.cat([cls, x], dim=1)
        positions = x.shape[1]
        gate = w["vision.gated_positional_embedding.gate"].tanh()
        x = x + (1 - gate) * w["vision.gated_positional_embedding.embedding"]
        grid = w["vision.gated_positional_embedding.tile_embedding.weight"][ratio_id].view(tiles, positions, width)
        x = torch.cat([x[:real_tiles] + gate * grid[:real_tiles], x[real_tiles:]])
        x = self._layer_norm(x, "vision.layernorm_pre")
        pad = 8 - positions % 8  # Meta's expand_num_tokens_to_mult8 (8 when already a multiple)
        x = torch.cat([x, x.new_zeros(tiles, pad, width)], dim=1)
        length = positions + pad
        padding = torch.ones(tiles, length)
        padding[:real_tiles, :positions] = 0
        padding = padding.reshape(-1, 1).bool()
        mask = ~(padding & padding.T)  # hidden only when both are padding
        intermediate = self.vision["intermediate_layers_indices"]
        x, kept = self._tower("vision.transformer", x.reshape(-1, width), mask, gated=False, keep=intermediate)
        x = self._layer_norm(x, "vision.layernorm_post").view(tiles, length, width)
        x = self._tile_embedding(x, "post_tile_positional_embedding", ratio_id, real_tiles)
        x, _ = self._tower("vision.global_transformer", x.reshape(-1, width), mask, gated=True, keep=())
        x = x.view(tiles, length, width)[:, :positions]
        stacked = torch.stack(kept, dim=-1).reshape(tiles, length, -1)[:, :positions]
        return torch.cat([x, stacked], dim=-1)

    def _tile_embedding(self, x, name, ratio_id, real_tiles):
        w = self.w[f"vision.{name}.embedding.weight"][ratio_id].view(self.vision["max_num_tiles"], 1, -1)
        gate = self.w[f"vision.{name}.gate"].tanh()
        return torch.cat([x[:real_tiles] + gate * w[:real_tiles], x[real_tiles:]])

    def _layer_norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], eps=1e-5)

    def _tower(self, prefix, x, mask, gated, keep):
        kept, n = [], sum(1 for k in self.w if k.startswith(prefix + ".layers.") and k.endswith("q_proj.weight"))
        heads = self.vision["attention_heads"]
        for i in range(n):
            p = f"{prefix}.layers.{i}."
            if i in keep:
                kept.append(x)  # the block's input
            g_attn = self.w[p + "gate_attn"].tanh() if gated else 1.0
            g_ffn = self.w[p + "gate_ffn"].tanh() if gated else 1.0
            h = self._layer_norm(x, p + "input_layernorm")
            q, k, v = (self._heads(h @ self.w[p + f"self_attn.{n_}_proj.weight"].T, heads) for n_ in "qkv")
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0]
            x = x + g_attn * (a.transpose(0, 1).reshape(x.shape) @ self.w[p + "self_attn.o_proj.weight"].T)
            h = self._layer_norm(x, p + "post_attention_layernorm")
            h = F.gelu(h @ self.w[p + "mlp.fc1.weight"].T + self.w[p + "mlp.fc1.bias"])
            x = x + g_ffn * (h @ self.w[p + "mlp.fc2.weight"].T + self.w[p + "mlp.fc2.bias"])
        return x, kept

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(positions, heads·dim)`` → ``(1, heads, positions, dim)`` (4-d: torch's fast CPU attention)."""
        return x.view(x.shape[0], heads, -1).transpose(0, 1)[None]

    # -- text --------------------------------------------------------------------------------
    @torch.no_grad()
    def next_logits(self, tokens: Sequence[int], features: Optional[torch.Tensor] = None,
                    num_tiles: Sequence[int] = ()) -> torch.Tensor:
        """Float32 logits for the token after ``tokens`` (``features``: :meth:`image_features`)."""
        t, w = self.text, self.w
        eps = t["rms_norm_eps"]
        h = w["text.embed_tokens.weight"][torch.tensor(list(tokens))]
        angles = torch.outer(torch.arange(len(tokens), dtype=torch.float64), self.freqs)
        cross = None
        if features is not None:
            cross = self._cross_inputs(tokens, features, num_tiles)
        for i in range(t["num_hidden_layers"]):
            p = f"text.layers.{i}."
            if i in t["cross_attention_layers"]:
                if cross is not None:
                    h = self._cross_block(p, h, *cross)
                continue
            heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
            x = _rms(h, w[p + "input_layernorm.weight"], eps)
            q = _rotate((x @ w[p + "self_attn.q_proj.weight"].T).view(len(tokens), heads, -1), angles)
            k = _rotate((x @ w[p + "self_attn.k_proj.weight"].T).view(len(tokens), kv_heads, -1), angles)
            v = (x @ w[p + "self_attn.v_proj.weight"].T).view(len(tokens), kv_heads, -1)
            k, v = (y.repeat_interleave(heads // kv_heads, dim=1) for y in (k, v))
            a = F.scaled_dot_product_attention(*(y.transpose(0, 1)[None] for y in (q, k, v)), is_causal=True)[0]
            h = h + a.transpose(0, 1).reshape(h.shape) @ w[p + "self_attn.o_proj.weight"].T
            h = h + self._mlp(p, _rms(h, w[p + "post_attention_layernorm.weight"], eps))
        h = _rms(h[-1], w["text.norm.weight"], eps)
        return h @ w["lm_head"].T

    def _cross_inputs(self, tokens, features, num_tiles):
        """The cross-attention mask ``(tokens, images·tiles·positions)`` and each token's "sees an image"."""
        images, tiles, positions, _ = features.shape
        visible = torch.zeros(len(tokens), images, tiles, dtype=torch.bool)
        for image, (start, end) in enumerate(vision_spans(tokens, self.image_token)):
            visible[start:end, image, :num_tiles[image]] = True
        visible = visible.repeat_interleave(positions, dim=2).reshape(len(tokens), -1)
        sees = visible.any(-1, keepdim=True)
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        return features.reshape(-1, features.shape[-1]), mask * sees, sees.float()

    def _cross_block(self, p, h, states, mask, sees):
        t, w = self.text, self.w
        eps, heads, kv_heads = t["rms_norm_eps"], t["num_attention_heads"], t["num_key_value_heads"]
        a = p + "cross_attn."
        q = _rms((_rms(h, w[p + "input_layernorm.weight"], eps) @ w[a + "q_proj.weight"].T).view(len(h), heads, -1),
                 w[a + "q_norm.weight"], eps)
        k = _rms((states @ w[a + "k_proj.weight"].T).view(len(states), kv_heads, -1), w[a + "k_norm.weight"], eps)
        v = (states @ w[a + "v_proj.weight"].T).view(len(states), kv_heads, -1)
        k, v = (y.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)[None] for y in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask)[0].transpose(0, 1)
        out = (out * sees[:, :, None]).reshape(h.shape) @ w[a + "o_proj.weight"].T
        h = h + w[p + "cross_attn_attn_gate"].tanh() * out
        ffn = self._mlp(p, _rms(h, w[p + "post_attention_layernorm.weight"], eps)) * sees
        return h + w[p + "cross_attn_mlp_gate"].tanh() * ffn

    def _mlp(self, p, x):
        w = self.w
        return (F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)) @ \
            w[p + "mlp.down_proj.weight"].T

    # -- generation --------------------------------------------------------------------------
    def greedy(self, tokens: Sequence[int], inputs=None, max_new_tokens: int = 12, stop=()) -> List[int]:
        """Greedy tokens after the prompt ``tokens``; ``inputs``: the image processor's output (or None)."""
        return self.greedy_gaps(tokens, inputs, max_new_tokens, stop)[0]

    def greedy_gaps(self, tokens: Sequence[int], inputs=None, max_new_tokens: int = 12, stop=()):
        """:meth:`greedy`'s tokens, and at each step how far the chosen token's logit is above the
        runner-up's (where that is small, another implementation's rounding could choose otherwise)."""
        features, num_tiles = None, ()
        if inputs is not None and inputs.get("pixel_values") is not None:
            features = self.image_features(inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                           inputs["aspect_ratio_mask"])
            num_tiles = [int(n) for n in inputs["aspect_ratio_mask"][0].sum(-1)]
        seq, out, gaps = list(tokens), [], []
        for _ in range(max_new_tokens):
            top = self.next_logits(seq, features, num_tiles).topk(2)
            token = int(top.indices[0])
            out.append(token)
            gaps.append(float(top.values[0] - top.values[1]))
            seq.append(token)
            if token in stop:
                break
        return out, gaps


def _short(key: str) -> str:
    """A checkpoint name in this module's terms (Meta's repositories' names or transformers 5's)."""
    for old, new in (("model.language_model.", "text."), ("language_model.model.", "text."),
                     ("model.vision_model.", "vision."), ("vision_model.", "vision."),
                     ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector."),
                     ("language_model.lm_head.weight", "lm_head"), ("lm_head.weight", "lm_head")):
        if key.startswith(old):
            return new + key[len(old):]
    return key
