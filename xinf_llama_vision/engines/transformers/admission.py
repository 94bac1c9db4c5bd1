"""Admission by memory: how many bytes the running batch's cache may hold, and whether a batch fits.

The batch (:mod:`.batch`) pads every row's self-attention cache to the longest row and every row's
cross-attention keys and values to the row with the most images, so a batch of ``rows`` rows holds
``rows × (width × per_token + image_width × per_image_token)`` bytes
(:func:`...memory.cache_bytes`, the arithmetic of ``xinf-llama-vision estimate`` and of the launch
check). When a row joins or leaves, the cache is rebuilt beside the old one (so that a failure
half-way changes nothing), and for that moment both are held. Hence the rule:

* one row alone may use the whole budget (the longest context a launch allows is the one a single
  row fills it with, :meth:`Budget.context`);
* a batch of two or more rows stays within half of it, the other half being the rebuild's room.

A waiting request joins only while the batch with its row, :data:`JOIN_HEADROOM` tokens ahead,
keeps the rule (first come, first served: the queue's head waits rather than being overtaken). As
rows grow, the newest rows are put back in the queue before a step would break the rule, and come
back later with their tokens so far (:func:`.batch.resumed`), exactly where they were.

The budget (``--kv_cache_memory``, e.g. ``8GiB``) defaults to what the device has left after the
weights: on CUDA, the free memory of the model's GPUs less 10 % of their size and the activations of
one forward pass (:func:`...memory.activation_bytes`); elsewhere, half of the memory the system has
available, less the same activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ...memory import USABLE, Architecture, activation_bytes, image_kv_bytes_per_token, kv_bytes_per_token

#: Tokens of growth a joining row must leave room for, so that it is not put back at once.
JOIN_HEADROOM = 32
#: Most tokens prefilled in one forward pass of several prompts (a longer prompt is prefilled alone):
#: what the activations of :func:`default_limit` are sized for.
PREFILL_TOKENS = 8192


@dataclass
class Budget:
    """Bytes the batch's cache may hold at its peak, and what one token of a row costs."""

    limit: int
    per_token: int  # one text token of one row: K and V of every self-attention layer
    per_image_token: int  # one image key of one row: K and V of every cross-attention layer

    @classmethod
    def of(cls, arch: Architecture, dtype_bytes: int, limit: int) -> "Budget":
        return cls(limit, kv_bytes_per_token(arch, dtype_bytes), image_kv_bytes_per_token(arch, dtype_bytes))

    def need(self, rows: int, width: int, image_width: int) -> int:
        """The cache of ``rows`` rows padded to ``width`` tokens and ``image_width`` image keys."""
        return rows * (width * self.per_token + image_width * self.per_image_token)

    def holds(self, rows: int, width: int, image_width: int) -> bool:
        """Whether such a batch keeps the rule: alone, the whole budget; two or more rows, half of it.

        >>> b = Budget(limit=1000, per_token=10, per_image_token=1)
        >>> b.holds(1, 100, 0), b.holds(1, 101, 0), b.holds(2, 25, 0), b.holds(2, 26, 0)
        (True, False, True, False)
        """
        need = self.need(rows, width, image_width)
        return need <= self.limit if rows <= 1 else 2 * need <= self.limit

    def context(self, image_width: int) -> int:
        """The longest row (prompt and answer) that fits alone with ``image_width`` image keys.

        >>> Budget(limit=1000, per_token=10, per_image_token=1).context(image_width=100)
        90
        """
        return max(0, (self.limit - image_width * self.per_image_token) // self.per_token)


def default_limit(model, arch: Architecture, max_images: int, max_num_seqs: int) -> int:
    """The budget a launch gets without ``--kv_cache_memory`` (see the module's docstring)."""
    dtype_bytes = model.dtype.itemsize
    activations = activation_bytes(arch, PREFILL_TOKENS, max_images, max_num_seqs, dtype_bytes)
    if model.device.type == "cuda":
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        free, total = (sum(x) for x in zip(*(torch.cuda.mem_get_info(d) for d in devices)))
        return int(free - (1 - USABLE) * total - activations)
    import psutil

    return int(psutil.virtual_memory().available // 2 - activations)


def held_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of memory ``tensors`` keep alive: each underlying storage once (views share theirs)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's (and MPS's) out-of-memory error, or the CPU allocator's.

    >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")), is_out_of_memory(ValueError("x"))
    (True, False)
    >>> is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    True
    """
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))
