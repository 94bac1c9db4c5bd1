"""Sampling options and incremental decoding shared by the engines (pure, no torch).

OpenAI request fields → the options Llama 3.2 Vision generates with. Fields the request does
not set are left to the checkpoint's own ``generation_config.json`` (Meta ships temperature 0.6,
top_p 0.9), not to another family's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import RequestError

#: The logprob reported for a token that cannot come (-inf has no JSON), as OpenAI and vLLM report it.
IMPOSSIBLE = -9999.0


#: The most choices one request may ask for (``n``), and the most alternatives per token (``top_logprobs``).
MAX_N = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Sampling:
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    #: ``None``: unset (the checkpoint's ``generation_config`` decides, and without one there no top-k);
    #: ``0``: no top-k (a request's ``0`` or ``-1``, as OpenAI-compatible servers read them).
    top_k: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: Optional[float] = None
    #: How many alternatives each token's logprobs list; ``None``: no logprobs at all.
    logprobs: Optional[int] = None
    #: ``None`` (free text), ``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": {...}}``.
    response_format: Optional[Dict[str, Any]] = None
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
    xinf_llama_vision.errors.RequestError: top_p: must be between 0 and 1, got 2.0
    >>> sampling_from_config({"top_p": 0})
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: top_p: must be above 0 and at most 1 (1 keeps every token), got 0.0
    >>> [sampling_from_config({"top_k": k}).top_k for k in (None, -1, 0, 40)]
    [None, 0, 0, 40]
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
    top_p = _number(config, "top_p", float, 0, 1)
    if top_p == 0:
        raise RequestError("top_p: must be above 0 and at most 1 (1 keeps every token), got 0.0")
    options = config.get("stream_options")
    return Sampling(
        max_tokens=_number(config, "max_tokens", int, 1),
        temperature=_number(config, "temperature", float, 0, 2),
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        stop=tuple(stop),
        stop_token_ids=tuple(ids),
        stream=bool(config.get("stream")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        n=_number(config, "n", int, 1, MAX_N) or 1,
        seed=_number(config, "seed", int, -(2**63), 2**63 - 1),
        presence_penalty=_number(config, "presence_penalty", float, -2, 2) or 0.0,
        frequency_penalty=_number(config, "frequency_penalty", float, -2, 2) or 0.0,
        repetition_penalty=_repetition_penalty(config),
        logprobs=_logprobs(config),
        response_format=_response_format(config.get("response_format")),
    )


def _repetition_penalty(config: Dict[str, Any]) -> Optional[float]:
    """transformers' multiplicative penalty (1 is none), as Xinference passes it through."""
    value = _number(config, "repetition_penalty", float, 0)
    if value == 0:
        raise RequestError("repetition_penalty: must be > 0 (1 is no penalty), got 0.0")
    return None if value in (None, 1.0) else value


def _logprobs(config: Dict[str, Any]) -> Optional[int]:
    """How many alternatives per token the request wants, ``None`` for no logprobs: a chat sends
    ``logprobs: true`` and ``top_logprobs``, a completion ``logprobs: <count>``.

    >>> _logprobs({"logprobs": True, "top_logprobs": 3}), _logprobs({"logprobs": 2}), _logprobs({})
    (3, 2, None)
    >>> _logprobs({"top_logprobs": 3})
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: top_logprobs: needs "logprobs": true as well
    """
    value, top = config.get("logprobs"), _number(config, "top_logprobs", int, 0, MAX_TOP_LOGPROBS)
    if isinstance(value, bool) or value is None:
        if top is not None and not value:
            raise RequestError('top_logprobs: needs "logprobs": true as well')
        return (top or 0) if value else None
    if top is not None:
        raise RequestError("top_logprobs: goes with \"logprobs\": true (chat); a completion sends logprobs: <count>")
    return _number(config, "logprobs", int, 0, MAX_TOP_LOGPROBS)


def _response_format(value: Any) -> Optional[Dict[str, Any]]:
    """OpenAI's ``response_format``, checked: ``None`` for plain text, else the JSON it asks for.

    >>> _response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    {'type': 'json_schema', 'schema': {'type': 'object'}}
    >>> _response_format({"type": "xml"})
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: response_format.type: expected "text", "json_object" or "json_schema", got 'xml'
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError('response_format: expected an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise RequestError(f'response_format.type: expected "text", "json_object" or "json_schema", got {kind!r}')
    spec = value.get("json_schema")
    schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise RequestError('response_format.json_schema.schema: expected a JSON Schema object, as in '
                           '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", ...}}}')
    return {"type": "json_schema", "schema": schema}


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


class TokenBytes:
    """Each token's own bytes, read from a byte-level BPE tokenizer's pieces (Llama 3's): what OpenAI's
    ``logprobs[].bytes`` is for, since a token may hold only part of a character (an emoji, most CJK,
    many accented letters), and its text alone is then U+FFFD. Added (special) tokens are their text.

    ``tokenizer``: a transformers tokenizer (``convert_ids_to_tokens``, ``added_tokens_decoder``);
    the byte ↔ character table is transformers' own (``bytes_to_unicode``, as GPT-2 defined it).
    """

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self._tokenizer = tokenizer
        self._byte = {char: byte for byte, char in bytes_to_unicode().items()}
        self._added = set(tokenizer.added_tokens_decoder)

    def __call__(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(int(token_id))
        if token_id in self._added or not all(c in self._byte for c in piece):
            return piece.encode("utf-8")
        return bytes(self._byte[c] for c in piece)
