"""Chaos through a real ``xinference-local`` of its own (issue 21, item 6): a flood beyond the model's
request limit (``request_limits``), clients that hang up at every stage of a request, and the model's process killed
under load and recreated by Xinference. Nothing hangs (every request has a deadline), every answer
read to the end is raw transformers' own, the server keeps serving, and the model process's memory
comes back to its baseline. The order matters: each test starts from the state the last one left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

from conftest import base_env, serving
from load import CASES, check, expected_answers, run

LIMIT = 8  # --request-limits
DEADLINE = 240  # seconds for any one request: beyond it, something hangs
NAMES = [name for name in CASES if name != "hang-up"]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, tiny_checkpoint):
    home = tmp_path_factory.mktemp("xinference-chaos")
    with serving(home, base_env(home)) as srv:
        # request_limits is a launch setting of Xinference's REST API (and Python client), not of its CLI.
        status, reply = srv.post("/v1/models", {
            "model_uid": "chaos", "model_name": "llama-3.2-vision-instruct", "model_engine": "transformers",
            "model_path": tiny_checkpoint, "enable_virtual_env": False, "request_limits": LIMIT,
            "max_images": 2, "max_num_seqs": 4}, timeout=600)
        assert status == 200, reply
        yield srv


@pytest.fixture(scope="module")
def expected(reference):
    return expected_answers(reference)


def model_pids(server):
    """The model process's pid, in the order they loaded (Xinference recreates it after a crash)."""
    return [int(p) for p in re.findall(r"pid:(\d+) \S+ \S+ \S+ batch cache budget",
                                       server.log.read_text(errors="replace"))]


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def idle_reports(server) -> int:
    """How often the model reported being idle (the scheduler had nothing waiting or running)."""
    return server.log.read_text(errors="replace").count("batch cache: peak")


def settled(server, pid, baseline, slack=64 * 2**20):
    """The model process's RSS, once it is back within ``slack`` of ``baseline`` (or after 30 s)."""
    deadline = time.time() + 30
    while (now := rss(pid)) > baseline + slack and time.time() < deadline:
        time.sleep(1)
    return now


def attempt(server, name, expected, stream):
    """``(status, result)``: 200 and what :func:`load.run` returns, or the HTTP status of the error."""
    import openai

    try:
        return 200, run(server, "chaos", name, expected[name].options, stream)
    except openai.APIStatusError as error:
        return error.status_code, str(error)
    except openai.APIError as error:  # the connection ended without an answer
        return None, str(error)


@pytest.fixture(scope="module")
def baseline(chaos, expected):
    for name in NAMES:  # warm: the baseline is a model that served each kind of request
        run(chaos, "chaos", name, expected[name].options)
    time.sleep(2)  # past the scheduler's idle second, when it gives freed memory back
    pid = model_pids(chaos)[-1]
    return pid, rss(pid)


def test_a_flood_beyond_the_request_limit_gets_429s_and_exact_answers(chaos, expected, baseline):
    names = [NAMES[i % len(NAMES)] for i in range(4 * LIMIT)]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda i: attempt(chaos, names[i], expected, i % 2 == 0), range(len(names))))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, [r for r in results if r[0] != 200]
    assert statuses.count(429) > 0 and statuses.count(200) >= LIMIT, statuses
    # A refused stream reads our 429 (Xinference's own was an error event openai-python cannot read).
    assert all("request_limits" in text for i, (status, text) in enumerate(results) if status == 429 and i % 2 == 0)
    check([result for status, result in results if status == 200], expected)
    # Each refused request gave its slot back: a full round at the limit is served whole.
    with ThreadPoolExecutor(LIMIT) as pool:
        check(list(pool.map(lambda i: run(chaos, "chaos", NAMES[i % len(NAMES)],
                                          expected[NAMES[i % len(NAMES)]].options), range(LIMIT))), expected)


def raw_post(server, body: bytes, send: int, read: bool):
    """A client that sends the headers and ``send`` bytes of ``body`` and hangs up (reading the first
    bytes of the answer first, with ``read``)."""
    url = urlparse(server.endpoint)
    with socket.create_connection((url.hostname, url.port), timeout=DEADLINE) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:send])
        if read:
            s.recv(1)


def hang_up_streamed(server, expected, after_chunks: int):
    """A stream closed after ``after_chunks`` chunks (1: the first, sent when the request is accepted,
    maybe still queued; 3: mid-answer)."""
    messages, _, _ = CASES["hang-up"]
    stream = server.openai().chat.completions.create(model="chaos", messages=messages, max_tokens=400,
                                                     temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i + 1 >= after_chunks:
            break
    stream.close()


def hang_up_plain(server):
    """A plain request whose client gives up during the answer."""
    import httpx

    messages, _, _ = CASES["hang-up"]
    body = {"model": "chaos", "messages": messages, "max_tokens": 400, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.endpoint + "/v1/chat/completions", json=body, timeout=0.5)


def test_hang_ups_at_every_stage_leave_nothing_behind(chaos, expected, baseline):
    """Clients that hang up mid-body, after the body, while queued, mid-stream and mid-answer, all at
    once with others that read to the end: those are exact, the model comes back to idle (nothing
    left waiting or running), every request slot is free again, and memory returns to its baseline."""
    pid, before = baseline
    messages, _, _ = CASES["hang-up"]
    body = json.dumps({"model": "chaos", "messages": messages, "max_tokens": 400, "stream": True}).encode()
    reports = idle_reports(chaos)
    jobs = [lambda: raw_post(chaos, body, len(body) // 2, False), lambda: raw_post(chaos, body, len(body), False),
            lambda: raw_post(chaos, body, len(body), True), lambda: hang_up_streamed(chaos, expected, 1),
            lambda: hang_up_streamed(chaos, expected, 3), lambda: hang_up_plain(chaos)]
    with ThreadPoolExecutor(len(jobs) + 2) as pool:
        readers = [pool.submit(run, chaos, "chaos", name, expected[name].options) for name in NAMES[:2]]
        for future in [pool.submit(job) for job in jobs]:
            future.result(timeout=DEADLINE)
        check([f.result(timeout=DEADLINE) for f in readers], expected)
    deadline = time.time() + DEADLINE
    while idle_reports(chaos) == reports and time.time() < deadline:
        time.sleep(0.5)
    assert idle_reports(chaos) > reports, "the model never came back to idle: a request was left behind"
    with ThreadPoolExecutor(LIMIT) as pool:  # every slot free: a full round at the limit is served whole
        check(list(pool.map(lambda i: run(chaos, "chaos", NAMES[i % len(NAMES)],
                                          expected[NAMES[i % len(NAMES)]].options), range(LIMIT))), expected)
    after = settled(chaos, pid, before)
    assert after <= before + 64 * 2**20, f"model RSS {after >> 20} MiB, baseline {before >> 20} MiB"


def test_a_model_process_killed_under_load_is_recreated_and_serves_again(chaos, expected, baseline):
    """The model's process dies (SIGKILL) with requests running: each of them ends (an error, or its
    whole answer if it finished first), none hangs; Xinference recreates the model, which then answers
    exactly, in a process whose memory is back to the first one's baseline."""
    pid, before = baseline
    names = [NAMES[i % len(NAMES)] for i in range(LIMIT)]
    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(attempt, chaos, name, {**expected, name: expected[name]._replace(
            options={**expected[name].options, "max_tokens": 400, "stop": None})}, True) for name in names]
        time.sleep(1.0)  # the requests are running
        os.kill(pid, signal.SIGKILL)
        results = [f.result(timeout=DEADLINE) for f in futures]
    assert any(status != 200 for status, _ in results), "the kill came after every answer"
    deadline = time.time() + DEADLINE
    while (len(model_pids(chaos)) < 2 or model_pids(chaos)[-1] == pid) and time.time() < deadline:
        time.sleep(1)
    assert model_pids(chaos)[-1] != pid, "Xinference did not recreate the model"
    # Served again (the first requests after the recreation may still meet the old replica's state).
    deadline = time.time() + DEADLINE
    while attempt(chaos, "text only", expected, False)[0] != 200 and time.time() < deadline:
        time.sleep(2)
    with ThreadPoolExecutor(LIMIT) as pool:
        check(list(pool.map(lambda i: run(chaos, "chaos", NAMES[i % len(NAMES)],
                                          expected[NAMES[i % len(NAMES)]].options), range(LIMIT))), expected)
    time.sleep(2)
    new = model_pids(chaos)[-1]
    after = settled(chaos, new, before)
    assert after <= before + 64 * 2**20, f"new model RSS {after >> 20} MiB, first baseline {before >> 20} MiB"
