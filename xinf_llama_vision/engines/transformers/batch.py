"""One decode batch of Mllama sequences: rows of different lengths, with images or without, in one
forward pass per step, each row computing what it would compute alone.

Why not Xinference's batching hooks (``PytorchModel.batch_inference`` and its merged KV cache):
Mllama's cache holds two kinds of layers. Self-attention layers grow one token a step and can be
left-padded, as Xinference does; cross-attention layers hold each row's *image* keys and values,
whose length is images × tiles × patches per row, or nothing for a text-only row, and a row must
never attend to another row's image. Xinference's merge pads only along the text length and has
no per-row cross-attention mask; it also samples with its own code, not transformers' processors.
So this module keeps the batch, and :mod:`.scheduler` the requests.

How each row stays exactly itself (the parity the tests check against unbatched ``generate``):

* **Prefill** (:func:`prefill`) batches only prompts whose images have the same shape (or that have
  none), right-padded: the tokens before a prompt's first ``<|image|>`` see a fully masked
  cross-attention row, which Mllama turns into uniform attention over the row's own image keys, so
  padding those keys would change that average; right padding of the text is invisible to a
  prompt's own tokens under the causal mask.
* **Self-attention**: rows are left-padded to a common length, masked out, and given their own
  ``position_ids``.
* **Cross-attention**: image keys and values are right-padded with zeros to the longest row and
  masked out (``-inf``, an exact zero weight). A text-only row's whole row is masked: Mllama then
  zeroes the layer's MLP and attends uniformly over zero values, so the layer adds exactly nothing,
  as when the row alone skips the layer. A decode token always follows its prompt's last image,
  so an image row is never fully masked here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .admission import held_bytes

KV = Optional[Tuple[torch.Tensor, torch.Tensor]]


def cache_layers(cache, n_layers: int) -> List[KV]:
    """Per layer ``(keys, values)`` of a ``DynamicCache`` (transformers 4.x or 5.x), ``None`` when empty."""
    out: List[KV] = []
    for i in range(n_layers):
        if cache.get_seq_length(i) == 0:
            out.append(None)
        elif hasattr(cache, "layers"):  # transformers >= 4.56
            out.append((cache.layers[i].keys, cache.layers[i].values))
        else:
            out.append((cache.key_cache[i], cache.value_cache[i]))
    return out


def make_cache(layers: Sequence[KV]):
    """A ``DynamicCache`` holding ``layers`` (empty layers stay empty: Mllama skips them)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, kv in enumerate(layers):
        if kv is not None:
            cache.update(kv[0], kv[1], i)
    return cache


def image_keys_mask(model, cross_attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Which cross-attention keys the prompt's last token (and so every generated one) attends to:
    a ``(images × tiles × patches,)`` bool vector, or ``None`` for a text-only prompt."""
    if cross_attention_mask is None:
        return None
    last = cross_attention_mask[0, -1].reshape(-1).bool()  # (images × tiles,)
    return last.repeat_interleave(model.model.vision_model.num_patches)


def resumed(inputs, ids: Sequence[int]):
    """A prompt's processor ``inputs`` with the tokens ``ids`` holds beyond it appended: how a row put
    back in the queue (:mod:`.admission`) is prefilled again, where it was. A generated token attends
    to the images as the prompt's last token does (every image before it), so the cross-attention
    mask's last row is repeated.

    >>> x = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    >>> resumed(x, [5, 6, 7, 8])["input_ids"].tolist(), resumed(x, [5, 6]) is x
    ([[5, 6, 7, 8]], True)
    """
    extra = len(ids) - int(inputs["input_ids"].shape[1])
    if extra == 0:
        return inputs
    out = dict(inputs)
    out["input_ids"] = torch.tensor([list(ids)], dtype=inputs["input_ids"].dtype)
    out["attention_mask"] = torch.ones_like(out["input_ids"], dtype=inputs["attention_mask"].dtype)
    mask = inputs.get("cross_attention_mask")
    if mask is not None:
        out["cross_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, extra, *mask.shape[2:])], dim=1)
    return out


def prefill_key(inputs) -> Optional[Tuple[int, ...]]:
    """Prompts with the same key can be prefilled together: the shape of their images (the processor
    pads every image to the same tiles), ``None`` for text-only prompts."""
    pixels = inputs.get("pixel_values")
    return None if pixels is None else tuple(pixels.shape)


def cross_keys_values(model, states: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """What each cross-attention layer makes of images' projector output ``states`` ``(images, tiles,
    patches, hidden)``: its keys and values, ``(images, kv heads, tiles × patches, head dim)`` each, in
    layer order. The layer's own projections and key norm, as its forward applies them (to 3-D input:
    bitsandbytes' int8 layers take no other)."""
    text = model.model.language_model
    n = states.shape[0]
    states = states.reshape(-1, *states.shape[-2:])  # (images × tiles, patches, hidden), as Mllama passes them
    out = []
    for index in model.config.text_config.cross_attention_layers:
        attn = text.layers[index].cross_attn
        keys = attn.k_proj(states).view(n, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
        values = attn.v_proj(states).view(n, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
        out.append((attn.k_norm(keys), values))
    return out


def image_kv(model, group: Sequence[Any], keys: Sequence[Sequence[str]], cache) -> Dict[int, KV]:
    """Each cross-attention layer's keys and values for the group's rows (their images one after the
    other, as Mllama's language model computes them): from ``cache`` (:class:`.reuse.ReuseCache`)
    where it holds an image's ``key``, else from one run of the vision tower, the projector and the
    layers' projections over the images it lacks (each once, however many rows send it), which the
    cache then keeps."""
    found, todo = {}, {}
    for r, row in enumerate(keys):
        for i, key in enumerate(row):
            if key not in found and key not in todo:
                hit = cache.get(key)
                if hit is not None:
                    found[key] = hit
                else:
                    todo[key] = (r, i)
    if todo:
        def pick(name: str) -> torch.Tensor:
            return torch.cat([group[r][name][:, i : i + 1] for r, i in todo.values()]).to(model.device)

        vision = model.model.vision_model(pixel_values=pick("pixel_values"), aspect_ratio_ids=pick("aspect_ratio_ids"),
                                          aspect_ratio_mask=pick("aspect_ratio_mask"))
        states = model.model.multi_modal_projector(vision.last_hidden_state)  # (images, 1, tiles, patches, hidden)
        layers = cross_keys_values(model, states[:, 0])
        for j, key in enumerate(todo):
            found[key] = [(k[j : j + 1], v[j : j + 1]) for k, v in layers]
            cache.put(key, found[key])
    cache.count(hits=sum(len(row) for row in keys) - len(todo), misses=len(todo))
    cross = model.config.text_config.cross_attention_layers
    return {index: tuple(torch.cat([torch.cat([found[key][n][part] for key in row], dim=2) for row in keys])
                         for part in (0, 1))
            for n, index in enumerate(cross)}


def first_token_layers(model, token: int) -> List[KV]:
    """The self-attention keys and values of ``token`` at a prompt's start, where it sees no image (the
    same in every such prompt, so computed once per model): Meta's cross-attention layers give such a
    token nothing (docs/fidelity.md), so the model runs without them."""
    memo = model.__dict__.setdefault("_xlv_first_token", {})
    if token not in memo:
        from transformers import DynamicCache

        ids = torch.tensor([[token]], device=model.device)
        out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(),
                          use_cache=True)
        memo[token] = cache_layers(out.past_key_values, model.config.text_config.num_hidden_layers)
    return memo[token]


def _starts_blind(group: Sequence[Any]) -> bool:
    """Whether every prompt of the group starts with the same token, and that token sees no image."""
    first = {int(x["input_ids"][0, 0]) for x in group}
    return len(first) == 1 and not any(bool(x["cross_attention_mask"][0, 0].any()) for x in group)


@torch.no_grad()
def prefill(model, group: Sequence[Any], cache=None, keys: Optional[Sequence[Sequence[str]]] = None,
            start: int = 0, prefix: Optional[List[KV]] = None) -> List[Tuple[torch.Tensor, List[KV], int]]:
    """Prompts of one :func:`prefill_key`, right-padded into one forward pass: for each, ``(float32
    logits of its last token, its cache layers, its length)``, what ``generate``'s first step gives it alone.

    With an image ``cache`` and each prompt's image ``keys``, the images' cross-attention keys and
    values come from the cache (:func:`image_kv`; the vision tower runs only for images it lacks),
    and the language model reads them from its cache, as it does for a token after a prompt's first.
    With ``prefix``, the prompts' first ``start`` tokens are already computed (their self-attention
    keys and values, the same for every row: :meth:`.reuse.ReuseCache.longest_prefix` for one row,
    or :func:`first_token_layers`), and only the rest goes through the model, after them.

    Right padding keeps each prompt exactly itself: its tokens come first, so the causal mask hides
    the padding from them, and its image keys are as long as every other row's (same image shape)."""
    from transformers import DynamicCache

    F = torch.nn.functional
    device = model.device
    images = prefill_key(group[0]) is not None
    from_cache = images and cache is not None and keys is not None
    if from_cache and prefix is None:
        if _starts_blind(group):
            start, prefix = 1, first_token_layers(model, int(group[0]["input_ids"][0, 0]))
        else:  # the language model reads cached keys only after a first token: the vision tower runs
            from_cache = False
    lengths = [int(x["input_ids"].shape[1]) for x in group]
    width = max(lengths)
    pad_id = getattr(model.config.text_config, "pad_token_id", None) or 0

    def padded(name: str, value: int = 0) -> torch.Tensor:
        rows = [x[name].to(device) for x in group]  # queued requests keep theirs off the device
        # pad the text dimension (1) at its end; the others stay
        return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]), value=value) for t in rows])

    batch = {"input_ids": padded("input_ids", pad_id)[:, start:], "attention_mask": padded("attention_mask"),
             "use_cache": True}
    layers: List[KV] = [None] * model.config.text_config.num_hidden_layers
    if prefix is not None:
        layers = [None if kv is None else (kv[0].expand(len(group), -1, -1, -1), kv[1].expand(len(group), -1, -1, -1))
                  for kv in prefix]
        positions = torch.arange(start, width, device=device)
        batch["position_ids"] = positions[None].expand(len(group), -1)
        if _takes_cache_position(type(model.model)):  # transformers 4.x: the positions that pick the mask's rows
            batch["cache_position"] = positions
    if images:
        # The whole prompt's: Mllama picks the rows of the tokens it is given by their positions.
        batch["cross_attention_mask"] = padded("cross_attention_mask")
        if from_cache:
            for index, kv in image_kv(model, group, keys, cache).items():
                layers[index] = kv
        else:
            for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
                batch[name] = torch.cat([x[name].to(device) for x in group])
    batch["past_key_values"] = make_cache(layers) if any(kv is not None for kv in layers) else DynamicCache()
    out = model.model(**batch)
    last = out.last_hidden_state[torch.arange(len(group)), torch.tensor(lengths) - 1 - start]
    logits = model.lm_head(last).to(dtype=torch.float32)
    text = model.config.text_config
    layers = cache_layers(out.past_key_values, text.num_hidden_layers)
    cross = set(text.cross_attention_layers)
    rows = []
    for r, length in enumerate(lengths):
        own = [None if kv is None else
               (kv[0][r : r + 1], kv[1][r : r + 1]) if i in cross else
               (kv[0][r : r + 1, :, :length], kv[1][r : r + 1, :, :length])
               for i, kv in enumerate(layers)]
        rows.append((logits[r], own, length))
    return rows


@functools.lru_cache(maxsize=None)
def _takes_cache_position(mllama_model: type) -> bool:
    """Whether this transformers' ``MllamaModel.forward`` is told the new tokens' positions
    (``cache_position``, 4.x) rather than reading them from the cache (5.x); asked once per class."""
    return "cache_position" in inspect.signature(mllama_model.forward).parameters


def prefill_from(model, inputs, start: int, prefix: List[KV], cache=None, keys: Sequence[str] = ()
                 ) -> Tuple[torch.Tensor, List[KV], int]:
    """One prompt whose first ``start`` tokens are already in ``prefix`` (their self-attention keys and
    values, :meth:`.reuse.ReuseCache.longest_prefix`): :func:`prefill` of the rest (its images' keys
    and values from ``cache``). Returns what :func:`prefill` returns for it."""
    return prefill(model, [inputs], cache, [keys] if cache is not None else None, start, prefix)[0]


def _pad(t: torch.Tensor, left: int = 0, right: int = 0) -> torch.Tensor:
    """Zero-pad a ``(batch, heads, length, dim)`` tensor along its length."""
    return torch.nn.functional.pad(t, (0, 0, left, right)) if left or right else t


class DecodeBatch:
    """The running rows' caches as one batch; rows are addressed by their index in :attr:`lengths`."""

    def __init__(self, model):
        self.model = model
        text = model.config.text_config
        self.n_layers = text.num_hidden_layers
        self.cross_layers = set(text.cross_attention_layers)
        self.cache = None  # a DynamicCache the model appends to; rebuilt when rows join or leave
        self.pads: List[int] = []  # left padding of each row's self-attention cache
        self.lengths: List[int] = []  # real tokens in each row's cache (= the next token's position)
        self.image_keys: List[Optional[torch.Tensor]] = []  # each row's cross-attention key mask
        #: Most bytes the cache held at once (both copies while it was rebuilt), measured on its tensors.
        self.peak = 0

    def _layers(self) -> List[KV]:
        return cache_layers(self.cache, self.n_layers) if self.cache is not None else [None] * self.n_layers

    def __len__(self) -> int:
        return len(self.lengths)

    def _width(self) -> int:
        return self.pads[0] + self.lengths[0] if self.lengths else 0

    def _cross_width(self) -> int:
        return max((len(m) for m in self.image_keys if m is not None), default=0)

    width = property(_width, doc="Text tokens every row's self-attention cache is padded to.")
    image_width = property(_cross_width, doc="Image keys every row's cross-attention cache is padded to.")

    def held(self, *more: List[KV]) -> int:
        """Bytes the cache's tensors keep alive (with ``more`` layers: those too, once each), and the peak."""
        tensors = [t for layers in (self._layers(), *more) for kv in layers if kv is not None for t in kv]
        held = held_bytes(tensors)
        self.peak = max(self.peak, held)
        return held

    def row(self, r: int) -> List[KV]:
        """Row ``r``'s self-attention keys and values without its padding (views; ``None`` for the
        cross-attention layers): its :attr:`lengths` tokens, for the prefix cache."""
        pad, length = self.pads[r], self.lengths[r]
        return [None if kv is None or i in self.cross_layers else
                (kv[0][r : r + 1, :, pad : pad + length], kv[1][r : r + 1, :, pad : pad + length])
                for i, kv in enumerate(self._layers())]

    def rollback(self) -> None:
        """After a step that failed half-way: the self-attention layers it had already grown go back
        to the batch's width (views: nothing is allocated), so the batch is as before the step."""
        width = self._width()
        layers = [kv if kv is None or i in self.cross_layers or kv[0].shape[2] == width
                  else (kv[0][:, :, :width], kv[1][:, :, :width]) for i, kv in enumerate(self._layers())]
        self.cache = make_cache(layers)

    def add(self, new: List[KV], length: int, image_keys: Optional[torch.Tensor]) -> None:
        """Join a prefilled row (its cache ``new`` holds ``length`` tokens)."""
        layers = self._layers()
        width, row_width = self._width(), length
        target = max(width, row_width)
        cross_target = max(self._cross_width(), 0 if image_keys is None else len(image_keys))
        for i in range(self.n_layers):
            mine, theirs = layers[i], new[i]
            if i in self.cross_layers:
                if cross_target == 0:
                    continue
                parts = []
                for kv, rows in ((mine, len(self)), (theirs, 1)):
                    if rows == 0:
                        continue
                    if kv is None:  # text-only rows: zero keys and values, masked out
                        ref = next(x for x in (mine, theirs) if x is not None)[0]
                        zeros = ref.new_zeros((rows, ref.shape[1], cross_target, ref.shape[3]))
                        parts.append((zeros, zeros))
                    else:
                        right = cross_target - kv[0].shape[2]
                        parts.append((_pad(kv[0], right=right), _pad(kv[1], right=right)))
            else:
                parts = [] if mine is None else [(_pad(mine[0], left=target - width), _pad(mine[1], left=target - width))]
                parts.append((_pad(theirs[0], left=target - row_width), _pad(theirs[1], left=target - row_width)))
            layers[i] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        self.held(layers)  # the old cache and the new one, at once
        self.cache = make_cache(layers)
        self.pads = [p + target - width for p in self.pads] + [target - row_width]
        self.lengths.append(length)
        self.image_keys.append(image_keys)

    def remove(self, indexes: Sequence[int]) -> None:
        """Rows leave; padding no remaining row needs is trimmed. All or nothing: if rebuilding the
        cache fails (out of memory), the batch is as it was."""
        gone, layers = set(indexes), self._layers()
        keep = [i for i in range(len(self)) if i not in gone]
        if not keep:
            self.cache, self.pads, self.lengths, self.image_keys = None, [], [], []
            return
        index = torch.tensor(keep)
        prefix = keep == list(range(len(keep)))  # the last rows leave: views of the first, nothing copied
        trim = min(self.pads[i] for i in keep)
        image_keys = [self.image_keys[i] for i in keep]
        cross = max((len(m) for m in image_keys if m is not None), default=0)
        for i, kv in enumerate(layers):
            if kv is None:
                continue
            if prefix:
                k, v = kv[0][: len(keep)], kv[1][: len(keep)]
            else:
                k, v = kv[0].index_select(0, index.to(kv[0].device)), kv[1].index_select(0, index.to(kv[1].device))
            if i in self.cross_layers:
                layers[i] = (k[:, :, :cross], v[:, :, :cross]) if cross else None
            else:
                layers[i] = (k[:, :, trim:], v[:, :, trim:])
        self.held(layers)
        self.cache = make_cache(layers)
        self.pads = [self.pads[i] - trim for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        self.image_keys = image_keys

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its last token; return the next-token logits ``(rows, vocab)`` in float32."""
        model, device, dtype = self.model, self.model.device, self.model.dtype
        rows, width = len(self), self._width()
        attention = torch.ones((rows, width + 1), dtype=torch.long, device=device)
        for r, pad in enumerate(self.pads):
            attention[r, :pad] = 0
        kwargs = {}
        cross = self._cross_width()
        if cross:
            keys = torch.zeros((rows, cross), dtype=torch.bool, device=device)
            for r, m in enumerate(self.image_keys):
                if m is not None:
                    keys[r, : len(m)] = m.to(device)
            mask = torch.zeros((rows, 1, 1, cross), dtype=dtype, device=device)
            mask.masked_fill_(~keys[:, None, None, :], torch.finfo(dtype).min)
            full_row = keys.any(-1).to(dtype)[:, None, None, None]  # (rows, 1, 1, 1)
            kwargs.update(cross_attention_mask=mask * full_row, full_text_row_masked_out_mask=full_row)
        out = model.model.language_model(
            input_ids=torch.tensor(list(tokens), device=device)[:, None],
            attention_mask=attention,
            position_ids=torch.tensor(self.lengths, device=device)[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.lengths = [n + 1 for n in self.lengths]
        self.held()
        return model.lm_head(out.last_hidden_state[:, -1, :]).to(dtype=torch.float32)
