"""The API guard's hold on a stream's start (``api/refusal.py``), driven with the ASGI messages
Xinference's route sends: held until the first event (to turn a refusal into a 400), but released by
a keep-alive comment, so that a stream queued in vLLM (whose first event is its first token) shows
proxies it is alive; Xinference's refusal of a stream over its request limit becomes a 429. And the
model side of a vLLM stream's early start (``engines.common.announced``): its acceptance marker,
which the guard sends as a comment with the headers."""

from __future__ import annotations

import asyncio
import json

import pytest

from xinf_llama_vision.api.refusal import Refusal
from xinf_llama_vision.engines.common import announced, answer_or_refusal
from xinf_llama_vision.errors import RequestError
from xinf_llama_vision.request import Policy
from xinf_llama_vision.request.wire import ACCEPTED_KEY, REFUSAL_KEY

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def body(data: bytes, more=True):
    return {"type": "http.response.body", "body": data, "more_body": more}


def sent_after(*messages):
    out = []

    async def send(message):
        out.append(message)

    async def go():
        guard = Refusal(send, Policy("instruct"))
        for m in messages:
            await guard(m)

    asyncio.run(go())
    return out


def test_the_start_waits_for_the_first_event():
    assert sent_after(START, body(b"")) == []
    out = sent_after(START, body(b'data: {"choices": []}\r\n\r\n'))
    assert [m["type"] for m in out] == ["http.response.start", "http.response.body"] and out[0]["status"] == 200


def test_a_refusal_in_the_first_event_is_a_400():
    out = sent_after(START, body(b"data: " + json.dumps({REFUSAL_KEY: "images[0]: not an image"}).encode() + b"\r\n\r\n"))
    assert out[0]["status"] == 400 and b"not an image" in out[1]["body"]


def test_a_keep_alive_comment_releases_a_waiting_stream():
    out = sent_after(START, body(b": ping - 2026-12-04 01:00:00\r\n\r\n"))
    assert out[0] == START and out[1]["body"].startswith(b": ping")


def test_a_stream_over_the_request_limit_is_a_429():
    out = sent_after(START, body(b'data: {"error": "Rate limit reached"}\r\n\r\n'))
    assert out[0]["status"] == 429 and (b"retry-after", b"1") in out[0]["headers"]
    assert b"request_limits" in out[1]["body"]


def event(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"


def test_the_acceptance_marker_starts_the_stream_as_a_comment():
    first = event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    out = sent_after(START, body(b": ping\r\n\r\n" + event({ACCEPTED_KEY: True})), body(first))
    assert out[0] == START
    assert out[1]["body"] == b": ping\r\n\r\n: accepted\r\n\r\n" and out[1]["more_body"]
    assert out[2]["body"] == first  # the stream goes on unchanged
    assert ACCEPTED_KEY.encode() not in b"".join(m.get("body", b"") for m in out)


def read(chunks, hang_up_after=None):
    """The chunks of an async stream (closed after ``hang_up_after`` of them), with their times."""
    async def go():
        out, start = [], asyncio.get_running_loop().time()
        try:
            async for chunk in chunks:
                out.append((round(asyncio.get_running_loop().time() - start, 2), chunk))
                if hang_up_after is not None and len(out) == hang_up_after:
                    break
        finally:
            await chunks.aclose()
        return out

    return asyncio.run(go())


class Engine:
    """A stream like vLLM's through Xinference: its first chunk after ``wait`` seconds (queued), or an
    error; records whether it was closed."""

    def __init__(self, wait: float, error: Exception = None):
        self.wait, self.error, self.closed = wait, error, False

    async def stream(self):
        try:
            await asyncio.sleep(self.wait)
            if self.error:
                raise self.error
            for i in range(3):
                yield {"choices": [{"index": 0, "text": str(i)}]}
        finally:
            self.closed = True


def test_a_queued_vllm_stream_is_announced_at_once_then_unchanged():
    engine = Engine(wait=0.6)
    out = read(announced(engine.stream(), after=0.05))
    assert out[0][1] == {ACCEPTED_KEY: True} and out[0][0] < 0.3
    assert [chunk for _, chunk in out[1:]] == [{"choices": [{"index": 0, "text": str(i)}]} for i in range(3)]
    assert out[1][0] >= 0.5 and engine.closed


def test_a_first_chunk_in_time_comes_without_the_marker_and_an_early_error_stays_first():
    assert [c for _, c in read(announced(Engine(wait=0).stream(), after=0.5))][0] == {"choices": [{"index": 0, "text": "0"}]}
    with pytest.raises(ValueError, match="vLLM refused it"):  # vLLM's own refusal: Xinference's error event, first
        read(announced(Engine(wait=0, error=ValueError("vLLM refused it")).stream(), after=0.5))


def test_a_client_that_hangs_up_while_queued_closes_the_engines_stream():
    import time

    engine, start = Engine(wait=30), time.monotonic()
    out = read(announced(engine.stream(), after=0.05), hang_up_after=1)
    assert out == [(out[0][0], {ACCEPTED_KEY: True})] and engine.closed
    assert time.monotonic() - start < 5  # not after 30 s: the wait for the first chunk was cancelled


def test_only_answers_that_pass_every_check_are_announced():
    """A refusal raised while the request is checked is the stream's only chunk (the guard's 400), never
    led by the marker however long the check took; a whole answer is returned as it is."""
    async def refused():
        await asyncio.sleep(0.3)
        raise RequestError("images[0]: not an image")

    async def answer():
        return {"choices": []}

    refusal = asyncio.run(answer_or_refusal(refused(), stream=True, announce=True))
    assert [c for _, c in read(refusal)] == [{REFUSAL_KEY: "images[0]: not an image"}]
    assert asyncio.run(answer_or_refusal(answer(), stream=False, announce=True)) == {"choices": []}
