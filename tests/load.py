"""Concurrent mixed requests for the load tests of every engine (``test_e2e_concurrency`` and the vLLM
stage): the cases, their expected answers from unbatched raw transformers, and one client per request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, NamedTuple, Optional

from oracle import data_uri, png
from parity import BLUE, RED

GREEN_WIDE = png((20, 200, 20), size=(200, 50))  # more tiles than RED or BLUE


def chat(images, question):
    content = [{"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


#: The date every case is rendered with, by the server (``chat_template_kwargs``) and by raw
#: transformers: a text-only prompt holds it, and the vLLM stage compares only answers whose
#: tokens are far from ties, which depends on the prompt (some dates leave none).
DATE = "01 Jan 2025"
ON_DATE = {"chat_template_kwargs": {"date_string": DATE}}

#: name → (messages, images, request options). "hang-up" streams are closed after their first chunk.
CASES = {
    "image, streamed": (chat([RED], "What is in this image?"), [RED], {"max_tokens": 12, "stream": True}),
    "text only": (chat([], "Write a haiku about the sea."), [], {"max_tokens": 20, "extra_body": ON_DATE}),
    "two images, streamed": (chat([BLUE, RED], "Compare them."), [BLUE, RED], {"max_tokens": 16, "stream": True}),
    "wide image, stop string": (chat([GREEN_WIDE], "Describe it."), [GREEN_WIDE], {"max_tokens": 24, "stop": "?"}),
    "top_k=1 at temperature 2": (chat([], "Name a colour."), [], {"max_tokens": 10, "temperature": 2.0,
                                                                  "extra_body": {"top_k": 1, **ON_DATE}}),
    "hang-up": (chat([RED], "Tell me a long story."), [RED], {"max_tokens": 2000, "stream": True}),
}


class Expected(NamedTuple):
    """What a case must get under load, and the request options to ask for it with."""

    text: str
    prompt_tokens: int
    completion_tokens: Optional[int]  # None where a stop string cut the answer
    finish_reason: str
    options: Dict[str, Any]


def expected_answers(reference, max_tokens=None) -> Dict[str, Expected]:
    """Raw transformers, one request at a time, greedy: each case's :class:`Expected`
    (``max_tokens``: name → a shorter answer for some cases)."""
    out = {}
    for name, (messages, images, options) in CASES.items():
        if name == "hang-up":
            continue
        options = dict(options, max_tokens=(max_tokens or {}).get(name, options["max_tokens"]))
        text, prompt_tokens, n = reference.generate(reference.render(messages, DATE), images, options["max_tokens"])
        finish = "length" if n == options["max_tokens"] else "stop"
        if options.get("stop"):
            # The stop string must cut this answer inside (else the case would test nothing): "?" if
            # it occurs after the start, else the first visible character from the middle on that
            # first occurs there.
            stop = "?"
            if text.find(stop) < 1:
                middle = [c for i, c in enumerate(text) if i >= len(text) // 2 and text.index(c) == i]
                stop = next(c for c in middle if not c.isspace() and c != "\ufffd")
            options["stop"] = stop
            text, n, finish = text[: text.index(stop)], None, "stop"  # tokens up to the match: not counted here
        out[name] = Expected(text, prompt_tokens, n, finish, options)
    return out


def tokens_far_from_ties(reference, name: str, margin: float) -> int:
    """How many of the case's greedy tokens (raw transformers) win by at least ``margin`` in logits:
    answers that long are the same under any engine's rounding; a near tie further on is not."""
    messages, images, options = CASES[name]
    gaps = reference.gaps(reference.render(messages, DATE), images, options["max_tokens"])
    return next((i for i, gap in enumerate(gaps) if gap < margin), len(gaps))


def run(server, uid, name, options=None, stream=None):
    """One request of case ``name`` (with ``options``, default the case's own): ``(name, text,
    (prompt_tokens, completion_tokens), finish_reason)``; a "hang-up" stream is closed after one chunk."""
    messages, _, case_options = CASES[name]
    options = {"temperature": 0, **(options or case_options)}
    if stream is not None:
        options["stream"] = stream
    if options.get("stream"):
        options["stream_options"] = {"include_usage": True}
    client = server.openai()
    reply = client.chat.completions.create(model=uid, messages=messages, **options)
    if not options.get("stream"):
        choice = reply.choices[0]
        return name, choice.message.content, (reply.usage.prompt_tokens, reply.usage.completion_tokens), \
            choice.finish_reason
    if name == "hang-up":
        next(iter(reply))
        reply.close()
        return name, None, None, None
    chunks = list(reply)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    return name, text, (usage.prompt_tokens, usage.completion_tokens), finish[0] if len(finish) == 1 else finish


def load_round(server, uid, expected, names, n=32, stream=None):
    """``n`` requests at once, cycling through ``names``, each with the options ``expected`` (from
    :func:`expected_answers`) was computed for (``stream`` overrides): what :func:`run` returns."""
    names = [names[i % len(names)] for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda name: run(server, uid, name, getattr(expected.get(name), "options", None), stream),
                             names))


def check(results, expected, compared=None):
    """Every answer read to the end (of the ``compared`` cases, default all) equals raw transformers',
    with its usage and finish_reason."""
    for name, text, usage, finish in results:
        if name == "hang-up" or (compared is not None and name not in compared):
            assert name == "hang-up" or text is not None
            continue
        want = expected[name]
        assert (text, finish, usage[0]) == (want.text, want.finish_reason, want.prompt_tokens), name
        if want.completion_tokens is not None:
            assert usage[1] == want.completion_tokens, name


def abort_midway(server, uid, request_id: str):
    """A long stream with its own ``request_id``, aborted by that id (Xinference's ``POST
    /v1/models/{uid}/requests/{id}/abort``) after its first tokens: ``(the abort's answer, the abort's
    answer when sent again, how the stream ended)``; the stream must end, not hang."""
    import httpx
    import openai

    messages, _, _ = CASES["hang-up"]
    stream = server.openai().chat.completions.create(model=uid, messages=messages, max_tokens=400, temperature=0,
                                                     stream=True, extra_body={"request_id": request_id})
    chunks = iter(stream)
    tokens = 0
    while tokens < 2:  # two with text: the engine is generating (a first role-only chunk may come before)
        chunk = next(chunks)
        tokens += bool(chunk.choices and chunk.choices[0].delta.content)
    headers = {"authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    url = f"{server.endpoint}/v1/models/{uid}/requests/{request_id}/abort"
    first = httpx.post(url, json={}, headers=headers, timeout=60).json()
    try:
        rest = list(chunks)
        ended = next((c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason), "closed")
    except openai.APIError as error:
        ended = f"error: {error}"
    again = httpx.post(url, json={}, headers=headers, timeout=60).json()
    return first, again, ended
