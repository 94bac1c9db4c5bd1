"""A stream queued in vLLM starts at once: its headers and a comment (``: accepted``) come when the
request has passed every check, not with its first token (``engines.common.announced``, the guard
in ``api/refusal.py``), so that a proxy with an idle timeout does not cut it; the answer that follows
is the one it gets alone, and a refusal still gets its 400 however busy the engine is.

The model is launched with ``--max_num_seqs 1``: one long answer ahead keeps the next request waiting.
Without the marker (``announce=True`` taken out of ``engines/vllm.py``) the headers came with the
first token, 4.2 and 4.6 seconds late: tried. Run on vLLM's V0 engine: in the V1 stage on this
2-core CPU, every new request to the server waits while a V1 answer is generated
(docs/reliability.md), so no request can be seen queued there.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from load import CASES

LONG = CASES["hang-up"][0]  # "Tell me a long story." about a picture
ROUTES = {
    "chat": ("/v1/chat/completions", {"messages": LONG}),
    "completion": ("/v1/completions", {"prompt": "<|begin_of_text|>Once upon a time"}),
}


@pytest.fixture(scope="module")
def one_seq(server, vllm_launch):
    uid = vllm_launch("llama-3.2-vision-instruct", "v0-one-seq", "--max_num_seqs", "1")
    yield uid
    server.cli("terminate", "--model-uid", uid, check=False)


def text_of(route: str, payload: dict) -> str:
    choice = payload["choices"][0]
    if route == "chat":
        return choice.get("delta", choice.get("message", {})).get("content") or ""
    return choice.get("text") or ""


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_queued_stream_gets_its_headers_at_once_and_its_solo_answer(server, one_seq, route):
    import httpx

    path, request = ROUTES[route]
    body = {"model": one_seq, **request, "max_tokens": 24, "temperature": 0}
    status, alone = server.post(path, body)
    assert status == 200, alone
    ahead = threading.Thread(target=lambda: server.post("/v1/chat/completions", {
        "model": one_seq, "messages": LONG, "max_tokens": 1500, "temperature": 0}, timeout=600))
    ahead.start()
    time.sleep(1.5)
    # A refusal still gets its 400 while the engine is busy: our checks come before the stream exists.
    status, refused = server.post(path, {**body, "max_tokens": 10 ** 6, "stream": True})
    assert status == 400 and "max_tokens" in refused["error"]["message"], refused
    start, lines = time.time(), []
    with httpx.stream("POST", server.endpoint + path, json={**body, "stream": True}, timeout=600) as response:
        headers_after = time.time() - start
        for line in response.iter_lines():
            if line:
                lines.append((time.time() - start, line))
    ahead.join()
    data = [(t, line[6:]) for t, line in lines if line.startswith("data: ")]
    assert response.status_code == 200 and headers_after < 3, (headers_after, lines[:3])
    assert lines[0][1] == ": accepted", lines[:3]
    assert data[0][0] > headers_after + 2, f"the answer ahead ended too soon to test the wait: {data[0][0]}"
    streamed = "".join(text_of(route, json.loads(d)) for _, d in data if d != "[DONE]")
    assert streamed == text_of(route, alone) and streamed, (streamed, alone)
