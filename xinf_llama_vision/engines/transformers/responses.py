"""OpenAI's response shapes for the Transformers engine: completions and chat completions, whole or
streamed, with any number of choices (``n``) and logprobs (pure functions over plain data).

Xinference's helpers (``generate_completion``, ``_to_chat_completion_chunk``) build one choice at
index 0 without logprobs; with ``n`` each streamed chunk carries its own choice's index.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

#: A token as logprobs show it: its text and its own bytes.
Piece = Tuple[str, bytes]
#: One token's logprob entry: the token, its logprob, and the alternatives ``[(token, logprob)]``.
Entry = Tuple[Piece, float, List[Tuple[Piece, float]]]


@dataclass
class Choice:
    """One answer as it accumulates."""

    text: str = ""
    finish: Optional[str] = None
    tokens: int = 0
    entries: Optional[List[Entry]] = None  # ``None``: no logprobs asked for


def new_id() -> str:
    return str(uuid.uuid4())


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: Optional[List[Entry]], offset: int = 0) -> Optional[Dict[str, Any]]:
    """The legacy completion shape: ``{tokens, token_logprobs, top_logprobs, text_offset}``.

    >>> completion_logprobs([(("Hi", b"Hi"), -0.1, [(("Hi", b"Hi"), -0.1), (("Yo", b"Yo"), -2.5)]), (("!", b"!"), -0.5, [])])
    {'tokens': ['Hi', '!'], 'token_logprobs': [-0.1, -0.5], 'top_logprobs': [{'Hi': -0.1, 'Yo': -2.5}, {}], 'text_offset': [0, 2]}
    """
    if entries is None:
        return None
    offsets, at = [], offset
    for (text, _), _, _ in entries:
        offsets.append(at)
        at += len(text)
    return {"tokens": [e[0][0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [{text: value for (text, _), value in e[2]} for e in entries], "text_offset": offsets}


def chat_logprobs(entries: Optional[List[Entry]]) -> Optional[Dict[str, Any]]:
    """The chat shape: ``{"content": [{token, logprob, bytes, top_logprobs}]}``; ``bytes`` are the token's
    own, also where it holds only part of a character (its text alone is then U+FFFD).

    >>> part = ("\\ufffd", bytes([240, 159]))  # the first half of an emoji's UTF-8
    >>> chat_logprobs([(part, -0.25, [(part, -0.25)])])["content"][0]
    {'token': '\\ufffd', 'logprob': -0.25, 'bytes': [240, 159], 'top_logprobs': [{'token': '\\ufffd', 'logprob': -0.25, 'bytes': [240, 159]}]}
    """
    if entries is None:
        return None

    def one(piece: Piece, logprob: float) -> Dict[str, Any]:
        return {"token": piece[0], "logprob": logprob, "bytes": list(piece[1])}

    return {"content": [{**one(piece, lp), "top_logprobs": [one(p, l) for p, l in top]} for piece, lp, top in entries]}


def completion(model: str, choices: List[Choice], prompt_tokens: int) -> Dict[str, Any]:
    return {
        "id": new_id(), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": c.text, "logprobs": completion_logprobs(c.entries),
                     "finish_reason": c.finish or "stop"} for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
    }


def chat_completion(model: str, choices: List[Choice], prompt_tokens: int) -> Dict[str, Any]:
    return {
        "id": "chat" + new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(c.entries), "finish_reason": c.finish or "stop"}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
    }


@dataclass
class Chunks:
    """The chunks of one streamed answer (all its choices): ``chat`` or completion chunks."""

    model: str
    chat: bool
    prompt_tokens: int
    id: str = field(default_factory=new_id)
    created: int = field(default_factory=lambda: int(time.time()))
    started: set = field(default_factory=set)  # choices whose first chunk went out (chat: with the role)

    def _chunk(self, choices: List[Dict[str, Any]], usage_: Optional[Dict[str, int]]) -> Dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": ("chat" if self.chat else "") + self.id, "object": kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": usage_}

    def piece(self, index: int, text: str, finish: Optional[str], entries: Optional[List[Entry]],
              completion_tokens: int) -> Dict[str, Any]:
        """A chunk of choice ``index``: new ``text`` (and its tokens' logprobs), or its end (``finish``).
        Completion chunks carry the usage so far; a chat chunk carries it when a choice ends."""
        if not self.chat:
            choice = {"index": index, "text": text, "logprobs": completion_logprobs(entries), "finish_reason": finish}
            return self._chunk([choice], usage(self.prompt_tokens, completion_tokens))
        delta: Dict[str, Any] = {"content": text}
        if index not in self.started:
            delta = {"role": "assistant", **delta}
            self.started.add(index)
        choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(entries), "finish_reason": finish}
        return self._chunk([choice], usage(self.prompt_tokens, completion_tokens) if finish else None)

    def usage(self, completion_tokens: int) -> Dict[str, Any]:
        """The last chunk when the request asked for ``stream_options.include_usage``: no choices."""
        return self._chunk([], usage(self.prompt_tokens, completion_tokens))
