"""Load is part of correctness: dozens of concurrent requests to one model through a real
``xinference-local`` over HTTP, streaming and not, images and text-only, clients that hang up.
Every answer that is read to the end equals unbatched raw transformers (greedy); nothing hangs;
abandoned answers leave the batch; memory does not grow from one round to the next.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from load import CASES, check, expected_answers, load_round, run


def processes(server):
    """MiB of RSS per process of the server's tree (for the message of a failed memory check)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    return {f"{p.pid} {' '.join(p.cmdline())[:60]}": p.memory_info().rss >> 20
            for p in [root, *root.children(recursive=True)]}


@pytest.fixture(scope="module")
def chat_uid(launched):
    """Two images per request allowed (Meta recommends one; the default is 1)."""
    return launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--max_images", "2")


@pytest.fixture(scope="module")
def expected(reference):
    return expected_answers(reference)


def test_32_concurrent_mixed_requests_equal_raw_transformers(server, chat_uid, expected):
    run(server, chat_uid, "text only", expected["text only"].options)  # warm: the baseline is a served model
    time.sleep(2)  # past the scheduler's idle second, when it gives freed memory back
    baseline, processes_before = server.rss(), processes(server)
    for round_ in range(2):
        results = load_round(server, chat_uid, expected, list(CASES))
        assert len(results) == 32
        check(results, expected)
        if round_ == 0:
            after_first = server.rss()
    # The same load again holds no more memory than the first time (no leak per request).
    assert server.rss() <= after_first + 64 * 2**20
    # The model still answers on its own afterwards.
    assert run(server, chat_uid, "text only", expected["text only"].options)[1] == expected["text only"].text
    # At rest, the memory the load took goes back to the system, but for what Python and the C
    # allocator keep (measured: ~36 MiB in the model process, ~7 MiB in the API process).
    deadline = time.time() + 30
    while server.rss() > baseline + 64 * 2**20 and time.time() < deadline:
        time.sleep(1)
    assert server.rss() <= baseline + 64 * 2**20, (baseline, server.rss(), processes_before, processes(server))


#: The model's log line for a row that left early: after how many tokens, and why.
LEFT = re.compile(r"a request left the batch after (\d+) of 2000 tokens: (the client went away|the request was aborted)")


@pytest.fixture(scope="module")
def one_row(launched):
    """One row (``--max_num_seqs 1``): the next request gets the slot only once the last one left."""
    return launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--max_num_seqs", "1")


def left_after(server, before: int, seconds: float = 30):
    """The log's early leavers once there are more than ``before`` (waiting up to ``seconds``)."""
    deadline = time.time() + seconds
    while len(LEFT.findall(server.log.read_text())) == before and time.time() < deadline:
        time.sleep(0.2)
    return LEFT.findall(server.log.read_text())


def test_clients_that_hang_up_leave_the_batch(server, one_row, expected):
    """A stream that would run 2000 tokens is abandoned after its first chunk: it leaves the batch
    at once (Xinference's abort reaches the engine by request id; no garbage collection needed), and
    the next request gets the slot and its answer."""
    before = len(LEFT.findall(server.log.read_text()))
    run(server, one_row, "hang-up")
    found = left_after(server, before)
    assert len(found) == before + 1 and int(found[-1][0]) < 2000
    assert run(server, one_row, "text only", expected["text only"].options)[1] == expected["text only"].text


def test_a_client_that_hangs_up_before_a_whole_answer_leaves_the_batch(server, one_row, expected):
    """Not streamed: the client gives up after a second (Xinference itself only watches vLLM's and
    streams' clients; the guard watches ours), the request is cancelled down to the engine."""
    import httpx

    messages, _, _ = CASES["hang-up"]
    before = len(LEFT.findall(server.log.read_text()))
    client = server.openai().with_options(timeout=httpx.Timeout(1.0, connect=10.0))
    with pytest.raises(Exception, match="timed out"):
        client.chat.completions.create(model=one_row, messages=messages, max_tokens=2000, temperature=0)
    found = left_after(server, before)
    assert len(found) == before + 1 and found[-1][1] == "the client went away" and int(found[-1][0]) < 2000
    assert run(server, one_row, "text only", expected["text only"].options)[1] == expected["text only"].text


def test_a_queued_stream_starts_at_once_and_is_kept_alive(server, one_row):
    """With the one row busy for a while (two long answers ahead in the queue), a stream waits: its
    headers and first chunk (the role, no text) come at once, and keep-alive comments come at least
    every 15 seconds (Xinference's default is 600) until its tokens do: a proxy with a minute's idle
    timeout keeps it."""
    import threading

    import httpx

    from xinf_llama_vision.api.guard import KEEPALIVE_SECONDS

    messages, _, _ = CASES["hang-up"]
    busy = [threading.Thread(target=lambda: server.post("/v1/chat/completions", {
        "model": one_row, "messages": messages, "max_tokens": 3000, "temperature": 0}, timeout=600)) for _ in range(2)]
    for thread in busy:
        thread.start()
        time.sleep(1)
    body = {"model": one_row, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    start, lines = time.time(), []
    with httpx.stream("POST", server.endpoint + "/v1/chat/completions", json=body, timeout=600) as response:
        headers_after = time.time() - start
        for line in response.iter_lines():
            lines.append((time.time() - start, line))
    for thread in busy:
        thread.join()
    data = [(t, line) for t, line in lines if line.startswith("data: ")]
    first = json.loads(data[0][1][6:])["choices"][0]["delta"]
    assert response.status_code == 200 and headers_after < 10 and data[0][0] < 10, (headers_after, data[:2])
    assert first == {"role": "assistant", "content": ""}
    waited = [t for t, line in lines if line.startswith(":")]
    second = data[1][0]  # the first token's chunk: after the busy request left the row
    assert second > KEEPALIVE_SECONDS + 3 and waited, f"the busy requests ended too soon to test the keep-alive: {second}"
    marks = [0.0] + [t for t in waited if t < second] + [second]
    assert max(b - a for a, b in zip(marks, marks[1:])) < KEEPALIVE_SECONDS + 5, marks


def test_an_abort_by_request_id_ends_the_stream(server, one_row, expected):
    """``POST /v1/models/{uid}/requests/{id}/abort`` (Xinference's own route) for a stream that sent
    its own ``request_id``: the row leaves the batch, the stream ends with an error, the next
    request is served."""
    import httpx
    import openai

    messages, _, _ = CASES["hang-up"]
    before = len(LEFT.findall(server.log.read_text()))
    stream = server.openai().chat.completions.create(model=one_row, messages=messages, max_tokens=2000,
                                                     temperature=0, stream=True,
                                                     extra_body={"request_id": "abort-me-please"})
    chunks = iter(stream)
    next(chunks)
    headers = {"authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    answer = httpx.post(f"{server.endpoint}/v1/models/{one_row}/requests/abort-me-please/abort", json={},
                        headers=headers, timeout=60)
    assert answer.status_code == 200 and answer.json() == {"msg": "DONE"}
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    found = left_after(server, before)
    assert len(found) == before + 1 and found[-1][1] == "the request was aborted"
    again = httpx.post(f"{server.endpoint}/v1/models/{one_row}/requests/abort-me-please/abort", json={},
                       headers=headers, timeout=60)
    assert again.json() == {"msg": "NOT_FOUND"}  # done with: nothing left to abort
    assert run(server, one_row, "text only", expected["text only"].options)[1] == expected["text only"].text


def test_a_bad_launch_option_for_max_num_seqs_fails_the_launch(server, tiny_checkpoint):
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "transformers",
                        "--model_path", tiny_checkpoint, "--model-uid", "bad-max-num-seqs",
                        "--disable-virtual-env", "--max_num_seqs", "0", check=False)
    assert result.returncode != 0
    assert "launch option max_num_seqs must be an integer >= 1, got 0" in result.stdout + result.stderr
