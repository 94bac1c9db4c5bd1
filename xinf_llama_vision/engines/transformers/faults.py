"""Injected faults, for the reliability tests (``tests/test_e2e_faults.py``) only.

With ``XLV_TEST_FAULTS=1`` in the model process's environment (``xinference launch --env
XLV_TEST_FAULTS 1``), a request whose prompt holds ``[[fail:STAGE]]`` fails at that stage of its way
through the engine, with :class:`InjectedFault`; every other request is served as always. Without
the variable (every real deployment) :func:`requested` returns nothing and no stage ever fails here.

The stages, in the order a request meets them (each a place where a real failure can happen: a
corrupt image, the processor, an out-of-memory error in a forward pass or a cache rebuild):

* ``images``: loading and decoding its images; ``processor``: the processor's tensors;
* ``prefill``: its prefill group's forward pass; ``join``: its row joining the running batch's cache;
* ``decode``: a decode step while its row is in the batch (after its second token);
* ``leave``: the batch's cache rebuild as its row leaves (once);
* ``oom``: a decode step while its row is in the batch runs out of memory half-way through the
  model's layers (once; ``torch.OutOfMemoryError`` from the last text layer, after the earlier ones
  grew the cache).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import FrozenSet

STAGES = ("images", "processor", "prefill", "join", "decode", "leave", "oom")
_TAG = re.compile(r"\[\[fail:(\w+)\]\]")


class InjectedFault(RuntimeError):
    """The failure a test asked for, at the stage it named."""


def requested(text: str) -> FrozenSet[str]:
    """The stages at which a request with prompt ``text`` fails (none unless the tests turned faults on).

    >>> os.environ.pop("XLV_TEST_FAULTS", None) and None
    >>> requested("hello [[fail:join]]")
    frozenset()
    >>> os.environ["XLV_TEST_FAULTS"] = "1"
    >>> sorted(requested("hello [[fail:join]] [[fail:decode]] [[fail:nowhere]]"))
    ['decode', 'join']
    >>> del os.environ["XLV_TEST_FAULTS"]
    """
    if os.environ.get("XLV_TEST_FAULTS") != "1":
        return frozenset()
    return frozenset(stage for stage in _TAG.findall(text) if stage in STAGES)


def check(stage: str, faults: FrozenSet[str]) -> None:
    """Fail here if the request asked to fail at ``stage``."""
    if stage in faults:
        raise InjectedFault(f"injected fault at the {stage} stage (XLV_TEST_FAULTS)")


@contextlib.contextmanager
def out_of_memory(model, rows):
    """Around a decode step: when a row of ``rows`` asked for ``oom`` (and has two tokens), the step
    runs out of memory in the model's last text layer, once."""
    armed = [seq for seq in rows if "oom" in seq.faults and not seq.finished and seq.generated >= 2]
    if not armed:
        yield
        return
    import torch

    armed[0].faults = armed[0].faults - {"oom"}

    def fail(module, args):
        raise torch.OutOfMemoryError("injected out-of-memory error in a decode step (XLV_TEST_FAULTS)")

    hook = model.model.language_model.layers[-1].register_forward_pre_hook(fail)
    try:
        yield
    finally:
        hook.remove()
