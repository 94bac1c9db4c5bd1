"""Sampling options and incremental decoding shared by the engines (pure, no torch).

OpenAI request fields → the options Llama 3.2 Vision generates with. Fields the request does
not set are left to the checkpoint's own ``generation_config.json`` (Meta ships temperature 0.6,
top_p 0.9), not to another family's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .messages import RequestError


@dataclass(frozen=True)
class Sampling:
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    stream: bool = False
    include_usage: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature == 0


def _number(config: Dict[str, Any], name: str, kind, low, high=None):
    value = config.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
        raise RequestError(f"{name}: expected a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise RequestError(f"{name}: expected an integer, got {value!r}")
    value = kind(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name}: must be {bound}, got {value!r}")
    return value


def sampling_from_config(config: Optional[Dict[str, Any]]) -> Sampling:
    """Validate the sampling fields of one request.

    >>> s = sampling_from_config({"max_tokens": 8, "temperature": 0, "stop": "END"})
    >>> (s.max_tokens, s.greedy, s.stop)
    (8, True, ('END',))
    >>> sampling_from_config({"top_p": 2})
    Traceback (most recent call last):
    ...
    xinf_llama_vision.messages.RequestError: top_p: must be between 0 and 1, got 2.0
    """
    config = dict(config or {})
    stop = config.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: expected a string or a list of non-empty strings")
    ids = config.get("stop_token_ids") or ()
    if isinstance(ids, int):
        ids = (ids,)
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise RequestError("stop_token_ids: expected a list of token ids")
    top_k = _number(config, "top_k", int, -1)
    options = config.get("stream_options")
    return Sampling(
        max_tokens=_number(config, "max_tokens", int, 1),
        temperature=_number(config, "temperature", float, 0, 2),
        top_p=_number(config, "top_p", float, 0, 1),
        top_k=None if top_k in (None, -1, 0) else top_k,
        stop=tuple(stop),
        stop_token_ids=tuple(ids),
        stream=bool(config.get("stream")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


class StopText:
    """Incremental text with stop strings: hold back what could still become a stop string.

    >>> s = StopText(["END"])
    >>> [s.feed("Hello E"), s.feed("N"), s.feed("D and more")], s.stopped
    (['Hello ', '', ''], True)
    """

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        held = max(
            (n for s in self.stops for n in range(1, min(len(s), len(self.pending) + 1)) if self.pending.endswith(s[:n])),
            default=0,
        )
        cut = len(self.pending) - held
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class Detokenizer:
    """Token ids → text deltas whose concatenation is exactly ``decode(all ids)``.

    Decodes a short window (as vLLM does) instead of the whole output at every step, and waits
    while the window ends in an incomplete UTF-8 sequence.

    >>> table = {1: "Hel", 2: "lo", 3: " w", 4: "orld"}
    >>> d = Detokenizer(lambda ids: "".join(table[i] for i in ids))
    >>> [d.add(i) for i in (1, 2, 3, 4)] + [d.flush()]
    ['Hel', 'lo', ' w', 'orld', '']
    """

    def __init__(self, decode):
        self.decode = decode
        self.ids: List[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]
