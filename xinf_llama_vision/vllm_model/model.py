"""``MllamaForConditionalGeneration`` for vLLM's V1 engine, written after transformers' modeling_mllama.

What is vLLM's: the self-attention decoder layers (``LlamaDecoderLayer``: paged KV cache,
rotary embeddings, tensor-parallel linears), the cross-attention KV cache (``CrossAttention``,
Whisper's), the encoder-decoder scheduling, sampling and serving.

What is ours:

* the **vision tower** (tiles, aspect-ratio and gated position embeddings, local and gated global
  layers, intermediate layers) and the projector, with tensor-parallel linears;
* the **cross-attention decoder layers** (tanh gates, q/k RMSNorm), and Meta's **per-token
  image mask**, which vLLM's ``CrossAttention`` does not have. vLLM caches the keys and values
  of what generated tokens see (the prompt's last run of images, :mod:`.layout`), and its kernel
  answers every decode row from that cache. A prompt's rows are recomputed at prefill with
  PyTorch's SDPA and each token's mask over all the request's tiles; text before the first image
  gets nothing from the layer (Meta multiplies the attention output and the MLP by the row's
  "sees an image" flag);
* the vision tower's **intermediate layers** as Meta's ``ImageTransformer`` hands them over: the
  *input* of each listed block, stacked on the last axis (docs/fidelity.md);
* **text-only requests skip the cross-attention layers**, as in transformers, also when they
  share a batch with image requests.

The encoder output of a request (one item, :mod:`.processing`) carries its own layout in a last
row (:func:`pack` / :func:`unpack`), so the decoder needs nothing from the processor but vLLM's
encoder outputs and attention metadata.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..images import layout
from .processing import FIELDS, MllamaDummyInputsBuilder, MllamaMultiModalProcessor, MllamaProcessingInfo

# ----------------------------------------------------------------------------------------------
# The encoder output of one request: its tiles' states, then one row describing the layout.


def pack(states: torch.Tensor, num_tiles: Sequence[int], decoded: Sequence[int]) -> torch.Tensor:
    """``states`` (rows in :func:`layout.order`) plus a last row ``[images, tiles…, decoded flags…]``.

    >>> packed = pack(torch.zeros(6, 8), [2, 1], decoded=[1])
    >>> packed[-1].tolist()
    [2.0, 2.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    >>> unpack(packed)[1:]
    ([2, 1], [1])
    """
    n = len(num_tiles)
    info = torch.zeros(1, states.shape[-1], dtype=states.dtype, device=states.device)
    info[0, 0] = n
    info[0, 1:1 + n] = torch.tensor(list(num_tiles), dtype=states.dtype)
    info[0, 1 + n + torch.tensor(list(decoded), dtype=torch.long)] = 1
    return torch.cat([states, info])


def unpack(packed: torch.Tensor) -> Tuple[torch.Tensor, List[int], List[int]]:
    """``(states, num_tiles, decoded images)`` of a :func:`pack`-ed encoder output."""
    info = packed[-1].tolist()
    n = int(info[0])
    tiles = [int(t) for t in info[1:1 + n]]
    decoded = [i for i in range(n) if info[1 + n + i] > 0.5]
    return packed[:-1], tiles, decoded


# ----------------------------------------------------------------------------------------------
# Vision tower


class VisionAttention(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.hidden_size // config.attention_heads
        self.heads = config.attention_heads // tp
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.attention_heads, bias=False,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=False, input_is_parallel=True,
                                        prefix=f"{prefix}.o_proj")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv, _ = self.qkv_proj(x)
        q, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out, _ = self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        return out


class VisionLayer(nn.Module):
    def __init__(self, config, gated: bool, prefix: str):
        super().__init__()
        self.self_attn = VisionAttention(config, f"{prefix}.self_attn")
        self.mlp = VisionMLP(config, f"{prefix}.mlp")
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionMLP(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True, prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True, input_is_parallel=True,
                                     prefix=f"{prefix}.fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        h, _ = self.fc2(F.gelu(h))
        return h


class VisionEncoder(nn.Module):
    def __init__(self, config, layers: int, gated: bool, prefix: str):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config, gated, f"{prefix}.layers.{i}") for i in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                keep: Sequence[int] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The last state, and the *input* of each block listed in ``keep``."""
        kept = []
        for i, layer in enumerate(self.layers):
            if i in keep:
                kept.append(x)
            x = layer(x, mask)
        return x, kept


class AspectRatioEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tiles, self.hidden = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.tiles * self.hidden)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        return x + self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.hidden) * self.gate.tanh()


class PositionEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tiles, self.hidden = config.max_num_tiles, config.hidden_size
        self.patches = layout.tokens_per_tile(config)
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.patches, self.hidden))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.tiles * self.patches * self.hidden)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        x = x + ((1 - self.gate.tanh()) * self.embedding).view(1, 1, self.patches, self.hidden)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(x.shape[0], self.tiles, self.patches, self.hidden)
        return x + self.gate.tanh() * tile


class VisionModel(nn.Module):
    def __init__(self, config, prefix: str = "vision_model"):
        super().__init__()
        self.config = config
        self.patches = layout.tokens_per_tile(config)
        self.intermediate = list(config.intermediate_layers_indices)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.gated_positional_embedding = PositionEmbedding(config)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(config)
        self.post_tile_positional_embedding = AspectRatioEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(config.hidden_size)
        self.layernorm_post = nn.LayerNorm(config.hidden_size)
        self.transformer = VisionEncoder(config, config.num_hidden_layers, False, f"{prefix}.transformer")
        self.global_transformer = VisionEncoder(config, config.num_global_layers, True, f"{prefix}.global_transformer")

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """``(images, tiles, 3, H, W)`` → ``(images, tiles, patches, vision_output_dim)``."""
        images, tiles = pixel_values.shape[:2]
        dim = self.config.hidden_size
        x = self.patch_embedding(pixel_values.flatten(0, 1).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(images, tiles, -1, dim)
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        x = x.reshape(images * tiles, -1, dim)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, dim), x], dim=1)
        x = self.gated_positional_embedding(x.reshape(images, tiles, self.patches, dim), aspect_ratio_ids)
        x = self.layernorm_pre(x)
        pad = (8 - self.patches % 8) % 8
        x = F.pad(x, (0, 0, 0, pad))
        length = self.patches + pad
        mask = tile_mask(aspect_ratio_mask, self.patches, length, x.dtype)
        x, kept = self.transformer(x.reshape(images, tiles * length, dim), mask, self.intermediate)
        x = self.layernorm_post(x).reshape(images, tiles, length, dim)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids)
        x, _ = self.global_transformer(x.reshape(images, tiles * length, dim), mask)
        # channel c of the k-th listed layer at c * K + k, after the final state's channels
        parts = [x, torch.stack(kept, dim=-1).flatten(-2)]
        return torch.cat([p.reshape(images, tiles, length, -1)[:, :, :self.patches] for p in parts], dim=-1)


def tile_mask(aspect_ratio_mask: torch.Tensor, patches: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The vision encoder's additive mask: a key is hidden from a query only when both lie in padding
    (padding tiles, or the positions added to reach a multiple of 8), as in transformers."""
    images, tiles = aspect_ratio_mask.shape
    pad = (1 - aspect_ratio_mask.to(dtype)).view(images, tiles, 1).repeat(1, 1, length)
    pad[:, :, patches:] = 1
    pad = pad.reshape(images, tiles * length, 1)
    return (pad @ pad.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Text decoder


@dataclass
class Step:
    """What the cross-attention layers need to know about the tokens of one forward step."""

    image_rows: torch.Tensor  # (tokens, 1): rows of requests with images (others skip the layers)
    masked_out: torch.Tensor  # (tokens, 1): 0 for prompt text before its first image (gets nothing)
    any_image: bool  # whether any row has images (else the cross-attention layers are skipped)
    encoder: Optional[torch.Tensor] = None  # prefilling requests' tile states, concatenated
    cached: Optional[torch.Tensor] = None  # the encoder rows vLLM caches, in its order
    prefills: List[Tuple[slice, slice, torch.Tensor]] = field(default_factory=list)  # tokens, rows, visible


class RowNorm(nn.Module):
    """RMSNorm over the last dimension in float32 (the q/k norms, per head)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class CrossAttentionLayer(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        quant = vllm_config.quant_config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.heads = config.num_attention_heads // tp
        self.kv_heads = max(1, config.num_key_value_heads // tp)
        hd, attn = self.head_dim, f"{prefix}.cross_attn"
        self.cross_attn = nn.Module()
        self.cross_attn.q_proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * hd, bias=False,
                                                      quant_config=quant, prefix=f"{attn}.q_proj")
        self.cross_attn.k_proj = ColumnParallelLinear(config.hidden_size, config.num_key_value_heads * hd, bias=False,
                                                      quant_config=quant, prefix=f"{attn}.k_proj")
        self.cross_attn.v_proj = ColumnParallelLinear(config.hidden_size, config.num_key_value_heads * hd, bias=False,
                                                      quant_config=quant, prefix=f"{attn}.v_proj")
        self.cross_attn.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, bias=False,
                                                   input_is_parallel=True, quant_config=quant, prefix=f"{attn}.o_proj")
        self.cross_attn.q_norm = RowNorm(hd, config.rms_norm_eps)
        self.cross_attn.k_norm = RowNorm(hd, config.rms_norm_eps)
        self.cross_attn.attn = CrossAttention(self.heads, hd, hd ** -0.5, num_kv_heads=self.kv_heads,
                                              cache_config=vllm_config.cache_config, quant_config=quant,
                                              prefix=f"{attn}.attn")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, quant_config=quant,
                            prefix=f"{prefix}.mlp")
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def _kv(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = self.cross_attn
        k = a.k_norm(a.k_proj(states)[0].view(-1, self.kv_heads, self.head_dim))
        v = a.v_proj(states)[0].view(-1, self.kv_heads, self.head_dim)
        return k, v

    def forward(self, hidden: torch.Tensor, step: Step) -> torch.Tensor:
        a = self.cross_attn
        x = self.input_layernorm(hidden)
        q = a.q_norm(a.q_proj(x)[0].view(-1, self.heads, self.head_dim))
        if step.encoder is not None:
            k, v = self._kv(step.encoder)
            out = a.attn(q.flatten(1), k[step.cached].flatten(1), v[step.cached].flatten(1))
            out = out.view(-1, self.heads, self.head_dim).clone()
            for tokens, rows, visible in step.prefills:
                out[tokens] = self._masked(q[tokens], k[rows], v[rows], visible)
            out = out.flatten(1)
        else:
            out = a.attn(q.flatten(1), None, None)
        out, _ = a.o_proj(out * step.masked_out)
        h = hidden + self.cross_attn_attn_gate.tanh() * out
        mlp = self.mlp(self.post_attention_layernorm(h)) * step.masked_out
        h = h + self.cross_attn_mlp_gate.tanh() * mlp
        return torch.where(step.image_rows, h, hidden)

    def _masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Attention of one prompt's rows over its tiles with Mllama's per-token mask (SDPA)."""
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=visible.unsqueeze(0))
        return out.transpose(0, 1)


class TextModel(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str = "language_model"):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size + 8, config.hidden_size)
        self.cross_layers = set(config.cross_attention_layers)
        self.layers = nn.ModuleList(
            CrossAttentionLayer(config, vllm_config, f"{prefix}.layers.{i}") if i in self.cross_layers
            else LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}", config=config)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: Step) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            if i in self.cross_layers:
                if step.any_image:
                    hidden = layer(hidden, step)
            else:
                hidden, residual = layer(positions, hidden, None)
                hidden = hidden + residual
        return self.norm(hidden)


# ----------------------------------------------------------------------------------------------
# The model vLLM loads


@MULTIMODAL_REGISTRY.register_processor(MllamaMultiModalProcessor, info=MllamaProcessingInfo,
                                        dummy_inputs=MllamaDummyInputsBuilder)
class MllamaForConditionalGeneration(nn.Module, SupportsMultiModal):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    #: Our module names for a checkpoint's: the names of Meta's repositories (which transformers also
    #: writes) and transformers 5's module names. vLLM applies it to the layer paths of a quantized
    #: checkpoint's config too (compressed-tensors' ``ignore``), so a layer the checkpoint left
    #: unquantized is found under either name.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={"rotary_emb.inv_freq": None},  # a buffer some checkpoints hold, not a weight
        orig_to_new_prefix={"model.vision_model.": "vision_model.", "model.language_model.": "language_model.",
                            "model.multi_modal_projector.": "multi_modal_projector.",
                            "language_model.model.": "language_model.", "language_model.lm_head.": "lm_head."})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> Optional[str]:
        if modality.startswith("image"):
            return "<|image|>"
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.text_config = config.text_config
        vision = config.vision_config
        self.image_token_id = config.image_token_index
        self.per_tile = layout.tokens_per_tile(vision)
        self.max_tiles = vision.max_num_tiles
        self.vision_model = VisionModel(vision)
        self.multi_modal_projector = nn.Linear(vision.vision_output_dim, self.text_config.hidden_size, bias=True)
        self.language_model = TextModel(self.text_config, vllm_config)
        self.lm_head = ParallelLMHead(self.text_config.vocab_size, self.text_config.hidden_size,
                                      quant_config=vllm_config.quant_config, prefix="lm_head")
        self.logits_processor = LogitsProcessor(self.text_config.vocab_size)
        self._self_attn_name = next(f"language_model.layers.{i}.self_attn.attn"
                                    for i in range(self.text_config.num_hidden_layers) if i not in self.language_model.cross_layers)
        self._cross_attn_name = f"language_model.layers.{min(self.language_model.cross_layers)}.cross_attn.attn"

    # -- vLLM's multimodal interface ---------------------------------------------------------
    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs) -> List[torch.Tensor]:
        if kwargs.get("pixel_values") is None:
            return []
        per_item = zip(*(_items(kwargs[name]) for name in FIELDS))
        out = []
        for pixels, ratio_ids, ratio_mask, num_tiles, decode_mask in per_item:
            dtype = self.multi_modal_projector.weight.dtype
            states = self.vision_model(pixels.to(dtype), ratio_ids, ratio_mask)
            states = self.multi_modal_projector(states)  # (images, tiles, patches, hidden)
            tiles = num_tiles.tolist()
            decoded = [i for i, on in enumerate(decode_mask.tolist()) if on]
            order = layout.order(tiles, decoded, self.max_tiles)
            rows = torch.cat([states[i, t] for i, t in order])
            out.append(pack(rows, tiles, decoded))
        return out

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None,
                        **kwargs) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds=None, encoder_outputs: Optional[List[torch.Tensor]] = None, **kwargs) -> torch.Tensor:
        step = self._step(input_ids, list(encoder_outputs or []))
        return self.language_model(input_ids, positions, step)

    def _step(self, input_ids: torch.Tensor, encoder_outputs: List[torch.Tensor]) -> Step:
        tokens = input_ids.shape[0]
        device, dtype = input_ids.device, self.multi_modal_projector.weight.dtype
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):  # micro-batching: not used by this model
            metadata = metadata[0] if metadata else None
        if not metadata:  # a profiling or warm-up run: every path, no masks
            step = Step(image_rows=torch.ones(tokens, 1, dtype=torch.bool, device=device),
                        masked_out=torch.ones(tokens, 1, dtype=dtype, device=device), any_image=True)
            if encoder_outputs:
                states = torch.cat([unpack(e)[0] for e in encoder_outputs])
                step.encoder, step.cached = states, torch.arange(states.shape[0], device=device)
            return step
        cross, selfattn = metadata[self._cross_attn_name], metadata[self._self_attn_name]
        starts = cross.query_start_loc.tolist()
        encoder_lens = cross.seq_lens.tolist()
        decoder_lens = selfattn.seq_lens.tolist()
        image_rows = torch.zeros(tokens, 1, dtype=torch.bool)
        masked_out = torch.ones(tokens, 1, dtype=dtype)
        prefills, states, cached, offset = [], [], [], 0
        pending = iter(encoder_outputs)
        ids = None
        for r, encoder_len in enumerate(encoder_lens):
            begin, end = starts[r], starts[r + 1]
            if encoder_len == 0 or end <= begin:
                continue
            image_rows[begin:end] = True
            if end - begin != decoder_lens[r]:
                continue  # decoding: the cache holds what it sees
            encoded = next(pending, None)
            if encoded is None:
                raise RuntimeError("vLLM scheduled a prompt with images without its encoder output")
            rows, tiles, decoded = unpack(encoded)
            if layout.cached_length(tiles, decoded, self.per_tile) != encoder_len:
                raise RuntimeError(f"encoder length {encoder_len} does not match the request's images {tiles}")
            if ids is None:
                ids = input_ids.tolist()
            visible, row_ok = self._prompt_mask(ids[begin:end], tiles, decoded, rows.shape[0])
            masked_out[begin:end] = row_ok
            prefills.append((slice(begin, end), slice(offset, offset + rows.shape[0]), visible.to(device)))
            cached.append(torch.arange(offset, offset + encoder_len))
            states.append(rows)
            offset += rows.shape[0]
        if next(pending, None) is not None:
            raise RuntimeError("an encoder output was left without its prompt")
        step = Step(image_rows=image_rows.to(device), masked_out=masked_out.to(device),
                    any_image=bool(image_rows.any()), prefills=prefills)
        if states:
            step.encoder, step.cached = torch.cat(states), torch.cat(cached).to(device)
        return step

    def _prompt_mask(self, prompt: Sequence[int], tiles: Sequence[int], decoded: Sequence[int],
                     total: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each prompt token's visible tile rows (Meta's spans, :func:`layout.image_spans`), and 0 for
        rows that see no image (the layer gives them nothing; their attention sees every row, so that
        SDPA has something to average)."""
        visible = torch.zeros(len(prompt), total, dtype=torch.bool)
        tile_rows = layout.rows(tiles, decoded, self.per_tile)
        for image, (start, end) in enumerate(layout.image_spans(prompt, self.image_token_id)):
            visible[start:end, tile_rows[image]] = True
        row_ok = visible.any(-1, keepdim=True)
        visible[~row_ok[:, 0]] = True
        return visible, row_ok.to(torch.float32)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- weights -----------------------------------------------------------------------------
    STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
               (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in self.hf_to_vllm_mapper.apply(weights):
            for ours, theirs, shard in self.STACKED:
                if theirs in name and ".cross_attn." not in name:
                    target = name.replace(theirs, ours)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                target = name
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def _items(value) -> List[torch.Tensor]:
    """A batched multimodal field as one tensor per item (vLLM stacks equal shapes, lists others)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return [v for v in value]
