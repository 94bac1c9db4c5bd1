"""Chat logprobs on the vLLM engine from the token ids, as the Transformers engine builds them.

Xinference's vLLM classes build logprobs in the legacy completion shape, by each token's text as vLLM
decoded it alone (``''`` or U+FFFD for part of a character), the alternatives as ``{text: logprob}``
(so alternatives with the same text merge), and derive a chat entry's ``bytes`` from that text. Our
classes fill four of Xinference's hooks with the functions here (pure, over plain data), so that a
chat entry's ``token`` is the tokenizer's text of the token id, its ``bytes`` the token's own, and
every alternative vLLM returned is listed:

* converting vLLM's output to a completion keeps each position's entries, from the token ids vLLM's
  output still has, beside the legacy lists under :data:`KEY` (:func:`keep_entries`);
* slicing a stream's logprobs slices them in step (:func:`slice_entries`);
* converting to a chat answer writes them in and drops the key (:func:`chat_entries`);
* a completion's answer drops the key (:func:`drop_entries`): the legacy shape stays Xinference's.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from ..generation import IMPOSSIBLE

#: The legacy logprobs' extra key, between our hooks only: :func:`position_entries` of each choice.
KEY = "xlv_entries"
Piece = Callable[[int], Tuple[str, bytes]]


def _entry(piece: Piece, token: int, logprob: float) -> Dict[str, Any]:
    text, data = piece(token)
    return {"token": text, "logprob": max(float(logprob), IMPOSSIBLE), "bytes": list(data)}


def position_entries(output: Any, piece: Piece) -> List[Optional[Dict[str, Any]]]:
    """One vLLM ``CompletionOutput``'s chat entries, one per generated token as Xinference lists them
    (``None`` where vLLM gave no logprobs); ``piece(token id) -> (text, bytes)``.

    >>> Logprob = type("Logprob", (), {"__init__": lambda self, v: setattr(self, "logprob", v)})
    >>> output = type("Out", (), {"token_ids": [7], "logprobs": [{7: Logprob(-0.5), 9: Logprob(float("-inf"))}]})
    >>> position_entries(output, lambda i: (f"t{i}", bytes([i])))
    [{'token': 't7', 'logprob': -0.5, 'bytes': [7], 'top_logprobs': [{'token': 't7', 'logprob': -0.5, 'bytes': [7]}, {'token': 't9', 'logprob': -9999.0, 'bytes': [9]}]}]
    """
    out: List[Optional[Dict[str, Any]]] = []
    logprobs = getattr(output, "logprobs", None) or []
    for i, token in enumerate(getattr(output, "token_ids", None) or []):
        entries = logprobs[i] if i < len(logprobs) else None
        if not entries or token not in entries:
            out.append(None)
            continue
        top = [_entry(piece, alt, lp.logprob) for alt, lp in entries.items()]
        out.append({**_entry(piece, token, entries[token].logprob), "top_logprobs": top})
    return out


def keep_entries(completion: Dict[str, Any], request_output: Any, piece: Piece) -> None:
    """Put each choice's :func:`position_entries` under :data:`KEY` of its legacy logprobs."""
    outputs = {output.index: output for output in request_output.outputs}
    for choice in completion.get("choices") or []:
        logprobs = choice.get("logprobs")
        if logprobs is not None and choice.get("index") in outputs:
            logprobs[KEY] = position_entries(outputs[choice["index"]], piece)


def slice_entries(sliced: Dict[str, Any], logprobs: Dict[str, Any], start: int) -> Dict[str, Any]:
    """``sliced`` (Xinference's slice of ``logprobs`` from ``start``) with the entries sliced alike."""
    if KEY in logprobs:
        sliced[KEY] = logprobs[KEY][start:]
    return sliced


def chat_entries(legacy_choices: List[Dict[str, Any]], chat_choices: List[Dict[str, Any]]) -> None:
    """The chat choices Xinference built from ``legacy_choices`` (in order), with the kept entries as
    their ``logprobs.content`` (Xinference lists only positions with a logprob; so do these)."""
    for legacy, choice in zip(legacy_choices, chat_choices):
        kept = (legacy.get("logprobs") or {}).pop(KEY, None)
        if kept is not None and isinstance(choice.get("logprobs"), dict):
            choice["logprobs"]["content"] = [entry for entry in kept if entry is not None]


def drop_entries(completion: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A completion (or a chunk) without the kept entries."""
    for choice in (completion or {}).get("choices") or []:
        if isinstance(choice.get("logprobs"), dict):
            choice["logprobs"].pop(KEY, None)
    return completion


async def drop_stream_entries(chunks: AsyncIterator[Dict[str, Any]]) -> AsyncIterator[Dict[str, Any]]:
    """A completion's stream without the kept entries (:func:`drop_entries` on each chunk)."""
    try:
        async for chunk in chunks:
            yield drop_entries(chunk)
    finally:  # a client that hangs up closes this generator: vLLM's request ends with Xinference's
        await chunks.aclose()
