"""What a request can reuse of earlier ones: its pictures, their keys and values, and its prompt's prefix.

People ask several questions about one picture, and every chat client sends the whole history with
the picture again each turn; many clients ask about one shared screenshot. :class:`ReuseCache`
keeps, within one memory budget, least recently used out first:

* **images**: each cross-attention layer's keys and values of each image (what the vision tower, the
  projector and the layer's projections make of it, :func:`.batch.image_kv`), so that a request
  whose images are all cached runs none of them (on 11B about 19 TFLOP in the vision tower and 0.9
  in the projections per 4-tile image; the keys and values take 4 times the projector output's
  bytes: 210 MB a 4-tile image in bfloat16);
* **prefixes**: the self-attention keys and values of finished requests' tokens (prompt and
  answer), so that a later prompt starting with the same tokens and the same images (the next turn
  of a conversation) prefills only what follows (:func:`.batch.prefill_from`).

Apart from that budget, :class:`KnownPictures` keeps what the processor made of the last pictures, by
the bytes they came from, so that a picture sent again is not decoded, resized and hashed again.

An image is known by a hash of what the model sees of it (:func:`image_keys`): the processor's
tiles (pixels after resizing and normalising), its aspect-ratio id and tile mask, and the caller's
scope. The same picture sent as a URL or as a data URI decodes to the same pixels and hits. A
prefix is known by its tokens, each ``<|image|>`` by its image's key, and the scope. Two scopes
never share an entry, so a hit tells nobody what someone else sent (docs/performance.md, "Caches
and privacy"). :class:`ReuseCache` is used from the scheduler's thread only; an entry evicted while a prefill uses
it stays alive for that prefill (the prefill holds the tensor).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

#: The shortest prefix worth reusing (a shorter one is prefilled again with the rest).
MIN_PREFIX = 16

#: A prompt's tokens as the prefix cache knows them: token ids, each ``<|image|>`` by its image's key.
Tokens = Tuple[Any, ...]


def image_keys(inputs, scope: str = "") -> List[str]:
    """One key per image of a processed prompt (``[]`` without images): a BLAKE2b hash of its tiles,
    aspect-ratio id and tile mask, and ``scope``.

    >>> x = {"pixel_values": torch.zeros(1, 2, 4, 3, 2, 2), "aspect_ratio_ids": torch.tensor([[1, 1]]),
    ...      "aspect_ratio_mask": torch.ones(1, 2, 4, dtype=torch.long)}
    >>> a, b = image_keys(x)
    >>> a == b, a == image_keys(x, scope="someone else")[0], len(a)
    (True, False, 32)
    """
    pixels = inputs.get("pixel_values")
    return [] if pixels is None else [image_key(inputs, i, scope) for i in range(pixels.shape[1])]


def image_key(inputs, i: int, scope: str) -> str:
    """The key of a processed prompt's image ``i`` (:func:`image_keys`)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(scope.encode())
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        part = inputs[name][0, i].contiguous().cpu()
        h.update(str((name, part.dtype, tuple(part.shape))).encode())
        h.update(part.numpy().tobytes())
    return h.hexdigest()


@dataclass
class Picture:
    """What the processor made of one image: its tiles ``(1, 1, tiles, 3, H, W)``, aspect-ratio id
    ``(1, 1)`` and tile mask ``(1, 1, tiles)``, its number of real tiles, and its key (:func:`image_keys`)."""

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    tiles: int
    key: str


def picture(processor, image, scope: str) -> Picture:
    """One decoded image through ``processor``'s image processor, and its key."""
    parts = processor.image_processor(images=[[image]], return_tensors="pt")
    names = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    return Picture(*(parts[name] for name in names), int(parts["num_tiles"][0][0]), image_key(parts, 0, scope))


def processed(processor, text: str, pictures: Sequence[Picture]):
    """What ``processor(images=…, text=text, add_special_tokens=False, return_tensors="pt")`` returns,
    from pictures it processed before: the text's tokens, the pictures one after the other, and the
    cross-attention mask by transformers' own functions (each ``<|image|>`` sees its tiles, as
    Mllama's processor builds it; ``tests/test_reuse.py`` checks it equals the processor's)."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    inputs = dict(processor.tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    if not pictures:
        return inputs
    ids = inputs["input_ids"][0].tolist()
    mask = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(ids, processor.image_token_id)], num_tiles=[[p.tiles for p in pictures]],
        max_num_tiles=processor.image_processor.max_image_tiles, length=len(ids))
    inputs["cross_attention_mask"] = torch.from_numpy(mask)
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        inputs[name] = torch.cat([getattr(p, name) for p in pictures], dim=1)
    return inputs


class KnownPictures:
    """The pictures of the last ``size`` images by the bytes they were decoded from (and the scope): a
    picture sent again (every turn of a chat client resends it) is neither decoded, nor resized, nor
    hashed again, since the same bytes make the same tiles under one model's processor. Host memory:
    ``size`` pictures of 4 tiles (15 MB each on 11B). Thread-safe: prompts are processed in worker threads."""

    def __init__(self, size: int = 16):
        self.size = size
        self._pictures: "OrderedDict[Tuple[str, bytes], Picture]" = OrderedDict()
        self._lock = threading.Lock()

    def find(self, scope: str, data: bytes) -> Tuple[Tuple[str, bytes], Optional[Picture]]:
        """``(digest, picture)`` of the image whose bytes are ``data``; ``picture`` is ``None`` when unknown."""
        digest = (scope, hashlib.blake2b(data, digest_size=16).digest())
        with self._lock:
            found = self._pictures.get(digest)
            if found is not None:
                self._pictures.move_to_end(digest)
        return digest, found

    def keep(self, digest: Tuple[str, bytes], found: Picture) -> Picture:
        """Know ``found`` by ``digest`` (:meth:`find`'s) from now on; returns it."""
        with self._lock:
            self._pictures[digest] = found
            while len(self._pictures) > self.size:
                self._pictures.popitem(last=False)
        return found


def prefix_tokens(ids: Sequence[int], image_token: int, images: Sequence[str], scope: str) -> Tokens:
    """``ids`` as the prefix cache knows them: the scope first, each ``<|image|>`` by its image's key.

    >>> prefix_tokens([1, 9, 2, 9], image_token=9, images=["a", "b"], scope="s")
    ('s', 1, 'a', 2, 'b')
    """
    keys = iter(images)
    return (scope,) + tuple(next(keys) if token == image_token else token for token in ids)


def _common(a: Tokens, b: Tokens) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _size(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_size(v) for v in value if v is not None)


@dataclass
class Stats:
    """What the cache did since the model loaded. An image hit is a request's image that ran no vision
    tower (cached, or sent by another row of the same prefill), a miss an image the vision tower ran
    for; a prefix hit is a prompt that reused a cached prefix, of ``reused`` tokens in all."""

    hits: int = 0
    misses: int = 0
    prefix_hits: int = 0
    reused: int = 0
    evictions: int = 0
    bytes: int = 0
    images: int = 0
    prefixes: int = 0

    def line(self) -> str:
        return (f"image cache: {self.hits} hits, {self.misses} misses, {self.evictions} evictions, "
                f"{self.images} images in {self.bytes} bytes; prefix cache: {self.prefix_hits} hits reusing "
                f"{self.reused} tokens, {self.prefixes} prefixes")


class ReuseCache:
    """Images' keys and values and prompt prefixes, at most ``limit`` bytes together, least recently used out first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.stats = Stats()
        self._entries: "OrderedDict[Any, Tuple[Any, int]]" = OrderedDict()

    # -- images ------------------------------------------------------------------------
    def get(self, key: str) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """The cross-attention layers' ``(keys, values)`` of the image ``key``, or ``None``."""
        found = self._entries.get(("image", key))
        if found is None:
            return None
        self._entries.move_to_end(("image", key))
        return found[0]

    def count(self, hits: int, misses: int) -> None:
        """``hits`` images of requests ran no vision tower; it ran for ``misses`` images."""
        self.stats.hits += hits
        self.stats.misses += misses

    def put(self, key: str, layers: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep an image's cross-attention ``layers`` (copies, so that the batch's tensors are not held)."""
        self._keep(("image", key), [tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in kv)
                                    for kv in layers])

    # -- prefixes ----------------------------------------------------------------------
    def longest_prefix(self, tokens: Tokens) -> Tuple[int, Optional[List[Any]]]:
        """``(n, layers)``: the longest cached prefix of ``tokens`` that leaves at least one token to
        prefill (at least :data:`MIN_PREFIX` tokens), its self-attention layers cut to its ``n``
        tokens (views); ``(0, None)`` when there is none. ``n`` counts tokens, not the scope."""
        best, found = 0, None
        for key, (layers, _) in self._entries.items():
            if key[0] != "prefix":
                continue
            n = min(_common(key[1], tokens), len(tokens) - 1) - 1  # tokens, without the scope
            if n > best:
                best, found = n, key
        if found is None or best < MIN_PREFIX:
            return 0, None
        self._entries.move_to_end(found)
        layers = self._entries[found][0]
        self.stats.prefix_hits += 1
        self.stats.reused += best
        return best, [None if kv is None else (kv[0][:, :, :best], kv[1][:, :, :best]) for kv in layers]

    def put_prefix(self, tokens: Tokens, layers: Sequence[Any]) -> None:
        """Keep a finished request's self-attention ``layers`` (``None`` for the others) for ``tokens``
        (copies); a prefix of an entry already kept is not kept again."""
        key = ("prefix", tuple(tokens))
        if key in self._entries or any(k[0] == "prefix" and len(k[1]) >= len(tokens) and k[1][: len(tokens)] == key[1]
                                       for k in self._entries):
            return
        self._keep(key, [None if kv is None else (kv[0].clone(), kv[1].clone()) for kv in layers])

    # -- both --------------------------------------------------------------------------
    def _keep(self, key, value) -> None:
        size = _size(value)
        if size > self.limit or key in self._entries:
            return
        while self.stats.bytes + size > self.limit:
            old_key, (_, old_size) = self._entries.popitem(last=False)
            self.stats.bytes -= old_size
            self.stats.evictions += 1
        self._entries[key] = (value, size)
        self.stats.bytes += size
        self.stats.images = sum(1 for k in self._entries if k[0] == "image")
        self.stats.prefixes = len(self._entries) - self.stats.images

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes, self.stats.images, self.stats.prefixes = 0, 0, 0
