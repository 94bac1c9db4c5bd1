"""Failures stay with their request, on the Transformers engine through a real ``xinference-local``.

The model is launched with ``--env XLV_TEST_FAULTS 1`` (:mod:`xinf_llama_vision.engines.transformers.faults`),
so a request whose prompt holds ``[[fail:STAGE]]`` fails at that stage: loading its images, the
processor, its prefill group, joining the batch, a decode step, leaving the batch. Each round sends
one such request among concurrent streamed and plain requests of the load cases (:mod:`load`): the
faulty one gets an error that names the stage, every other gets raw transformers' answer (for a
decode step: the rows that shared the failed step end with an error saying so, and only they), and
nothing waits forever (every request has a deadline). A failure while its row leaves the batch
concerns no request: every answer is whole, the faulty one's too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from load import CASES, check, chat, expected_answers, run
from oracle import Raw
from parity import RED

NAMES = [name for name in CASES if name != "hang-up"]
DEADLINE = 240  # seconds for any one request: beyond it, something hangs


@pytest.fixture(scope="module")
def uid(server, tiny_checkpoint):
    uid = server.launch("llama-3.2-vision-instruct", "faults", tiny_checkpoint, "--disable-virtual-env",
                        "--max_images", "2", "--env", "XLV_TEST_FAULTS", "1")
    yield uid
    server.cli("terminate", "--model-uid", uid, check=False)


@pytest.fixture(scope="module")
def expected(reference):
    return expected_answers(reference)


def faulty(stage):
    return chat([RED], f"Describe it. [[fail:{stage}]]")


def send_faulty(server, uid, stage, stream):
    """``(status, text)`` of the faulty request: its answer, or the error a client reads."""
    body = {"model": uid, "messages": faulty(stage), "max_tokens": 12, "temperature": 0, "stream": stream}
    status, reply = server.post("/v1/chat/completions", body, timeout=DEADLINE)
    return status, reply if isinstance(reply, str) else str(reply)


def round_with(server, uid, expected, stage, stream):
    """Two of each load case (alternately streamed) and the faulty one, all at once."""
    with ThreadPoolExecutor(2 * len(NAMES) + 1) as pool:
        fault = pool.submit(send_faulty, server, uid, stage, stream)
        others = [pool.submit(attempt, server, uid, name, expected[name].options, i % 2 == 0)
                  for i, name in enumerate(NAMES * 2)]
        return fault.result(timeout=DEADLINE), [f.result(timeout=DEADLINE) for f in others]


def attempt(server, uid, name, options, stream):
    """What :func:`load.run` returns, or ``(name, None, None, error text)`` if the request failed."""
    try:
        return run(server, uid, name, options, stream)
    except Exception as error:  # the client's own exception: what a user reads
        return name, None, None, str(error)


#: What the server's log says at each stage (with the exception and its traceback).
LOGGED = {"images": "loading a request's images failed", "processor": "the image processor failed on a request",
          "prefill": "a prefill failed", "join": "a request could not join the batch", "decode": "a decode step failed",
          "leave": "rows could not leave the batch"}


def logged(server, stage) -> int:
    return server.log.read_text(errors="replace").count(LOGGED[stage])


#: What the client of a request that failed at each stage reads (the exception's type, not its text).
WHERE = {"images": "while loading its images", "processor": "in the image processor", "prefill": "in its prefill",
         "join": "joining the running batch"}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("stage", list(WHERE))
def test_a_failure_before_decoding_ends_only_its_request(server, uid, expected, stage, stream):
    """The faulty request: a 500 (or, once its stream started, an error event) naming the stage."""
    before = logged(server, stage)
    (status, error), others = round_with(server, uid, expected, stage, stream)
    assert f"this request failed {WHERE[stage]} (InjectedFault)" in error, (status, error)
    assert logged(server, stage) > before
    assert "no other request was affected" in error
    assert status == 500 or (stream and status == 200 and '"error"' in error), (status, error)
    check(others, expected)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_failed_decode_step_ends_the_rows_in_it_and_no_other(server, uid, expected, stream):
    before = logged(server, "decode")
    (status, error), others = round_with(server, uid, expected, "decode", stream)
    assert logged(server, "decode") > before
    assert "this request failed in a decode step" in error and "(InjectedFault)" in error, (status, error)
    failed = [r for r in others if r[1] is None]
    for name, _, _, why in failed:
        assert "failed in a decode step it shared with" in why, (name, why)
    check([r for r in others if r[1] is not None], expected)
    check([run(server, uid, name, expected[name].options) for name in NAMES], expected)  # the next ones: whole


def test_a_row_that_cannot_leave_the_batch_costs_no_answer(server, uid, expected, reference):
    before = logged(server, "leave")
    (status, answer), others = round_with(server, uid, expected, "leave", False)
    assert logged(server, "leave") > before
    raw = Raw(reference)
    ids, _ = raw.chat(faulty("leave"), [RED], 12, do_sample=False)
    assert status == 200 and raw.text(ids) in answer, (status, answer)
    check(others, expected)


def test_a_decode_step_out_of_memory_costs_no_answer(server, uid, expected, reference):
    """The step runs out of memory half-way (``[[fail:oom]]``): it is undone and its newest rows go back
    to the queue; every answer is whole, the faulty one's too (alone in its step, it would fail in words)."""
    (status, answer), others = round_with(server, uid, expected, "oom", False)
    raw = Raw(reference)
    ids, _ = raw.chat(faulty("oom"), [RED], 12, do_sample=False)
    if status == 200:  # it shared the step: the step was undone and its newest rows went back to the queue
        assert raw.text(ids) in answer and "ran out of memory" in server.log.read_text(errors="replace")
    else:  # it was alone in the step by then
        assert status == 500 and "failed in a decode step (OutOfMemoryError)" in answer, (status, answer)
    check(others, expected)
