"""The image cache: what the vision tower and the projector made of an image, kept for the next
request that sends the same picture (a follow-up question in a conversation, many clients asking
about one screenshot), so that it runs no vision tower.

An image is known by a hash of what the model sees of it: the processor's tiles (pixels after
resizing and normalising), its aspect-ratio id and tile mask, and the scope of the caller
(:func:`image_keys`). The same picture sent as a URL or as a data URI decodes to the same pixels and
hits; two callers with different scopes never share an entry, so a hit tells nobody what someone
else sent (docs/performance.md, "Caches and privacy").

Entries are the projector's output for the image, ``(tiles, patches, hidden)``, on the model's
device: on 11B about 52 MB in bf16 for a 4-tile image, which saves the vision tower (about 19
TFLOP); the cross-attention keys and values are computed from it again (about 0.9 TFLOP). The cache
holds at most ``limit`` bytes; the least recently used entries go first. It is used from the
scheduler's thread only.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

import torch

logger = logging.getLogger("xinference.model.llm.xinf_llama_vision")


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
    if pixels is None:
        return []
    keys = []
    for i in range(pixels.shape[1]):
        h = hashlib.blake2b(digest_size=16)
        h.update(scope.encode())
        for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            part = inputs[name][0, i].contiguous().cpu()
            h.update(str((name, part.dtype, tuple(part.shape))).encode())
            h.update(part.numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


@dataclass
class Stats:
    """What the cache did since the model loaded: a hit is a request's image that ran no vision tower
    (cached, or sent by another row of the same prefill), a miss an image the vision tower ran for."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0

    def line(self) -> str:
        return (f"image cache: {self.hits} hits, {self.misses} misses, {self.evictions} evictions, "
                f"{self.entries} images in {self.bytes} bytes")


class ImageCache:
    """Projector outputs by image key, at most ``limit`` bytes, least recently used out first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.stats = Stats()
        self._entries: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def get(self, key: str) -> Optional[torch.Tensor]:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def count(self, hits: int, misses: int) -> None:
        """``hits`` images of requests ran no vision tower; it ran for ``misses`` images."""
        self.stats.hits += hits
        self.stats.misses += misses

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep ``features`` (a copy, so that the batch's tensors are not held) if they fit at all."""
        size = features.numel() * features.element_size()
        if size > self.limit or key in self._entries:
            return
        while self.stats.bytes + size > self.limit:
            _, old = self._entries.popitem(last=False)
            self.stats.bytes -= old.numel() * old.element_size()
            self.stats.evictions += 1
        self._entries[key] = features.detach().clone()
        self.stats.bytes += size
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes, self.stats.entries = 0, 0
