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
* ``leave``: the batch's cache rebuild as its row leaves (once).
"""

from __future__ import annotations

import os
import re
from typing import FrozenSet

STAGES = ("images", "processor", "prefill", "join", "decode", "leave")
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
