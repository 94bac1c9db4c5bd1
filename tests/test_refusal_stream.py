"""The API guard's hold on a stream's start (``api/refusal.py``), driven with the ASGI messages
Xinference's route sends: held until the first event (to turn a refusal into a 400), but released by
a keep-alive comment, so that a stream queued in vLLM (whose first event is its first token) shows
proxies it is alive; Xinference's refusal of a stream over its request limit becomes a 429."""

from __future__ import annotations

import asyncio
import json

from xinf_llama_vision.api.refusal import Refusal
from xinf_llama_vision.request import Policy
from xinf_llama_vision.request.wire import REFUSAL_KEY

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
