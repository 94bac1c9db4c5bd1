"""The scheduler's failure handling, step by step on the tiny checkpoint (real model, real batch): what
``tests/test_e2e_faults.py`` checks through a server, here where the timing is the test's own, so
that a prefill group really holds several requests and a row really fails to leave.

The scheduler's thread is stopped first; the test calls its steps (``_admit``, ``_step``) itself.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from parity import RED
from xinf_llama_vision.engines.transformers.scheduler import Scheduler, Sequence
from xinf_llama_vision.errors import RequestFailed


@pytest.fixture
def scheduler(reference):
    s = Scheduler(reference.model, max_num_seqs=8)
    s.close()  # the thread ends; the test runs the steps
    s._closed = False
    return s


def seq(reference, loop, question, faults=(), tokens=6):
    content = [{"type": "image"}, {"type": "text", "text": question}]
    inputs = reference.inputs(reference.render([{"role": "user", "content": content}], "01 Jan 2025"), [RED])
    stop = [reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    kwargs = {"max_new_tokens": tokens, "eos_token_id": stop, "do_sample": False}
    return Sequence.create(reference.model, inputs, kwargs, loop, injected=frozenset(faults))


def received(loop, s: Sequence):
    """What the sequence's caller got so far: token ids, then an exception if it failed."""
    loop.run_until_complete(asyncio.sleep(0))
    out = []
    while not s.out.empty():
        item = s.out.get_nowait()
        out.append(item if isinstance(item, BaseException) else item[0])
    return out


def alone(reference, loop, question, tokens=6):
    """The token ids a request gets alone in the batch (the reference for the others)."""
    s = Scheduler(reference.model, max_num_seqs=8)
    s.close()
    s._closed = False
    one = seq(reference, loop, question, tokens=tokens)
    s._waiting = [one]
    s._admit()
    while s._running:
        s._step()
    return received(loop, one)


QUESTIONS = ["What is this?", "Which colour is it?", "Is it round?"]


def test_a_failed_prefill_of_a_group_is_retried_one_by_one(reference, loop, scheduler, caplog):
    """Three requests with one image shape are prefilled together; one of them fails there: it alone
    ends (with the stage in words), the other two run and answer as they would alone."""
    seqs = [seq(reference, loop, q, faults={"prefill"} if i == 1 else ()) for i, q in enumerate(QUESTIONS)]
    scheduler._waiting = list(seqs)
    scheduler._admit()
    while scheduler._running:
        scheduler._step()
    failed = received(loop, seqs[1])
    assert len(failed) == 1 and isinstance(failed[0], RequestFailed) and "in its prefill" in str(failed[0])
    for i in (0, 2):
        assert received(loop, seqs[i]) == alone(reference, loop, QUESTIONS[i])
    assert "a prefill of 3 requests failed" in caplog.text  # they were one group


def test_a_row_that_cannot_join_ends_alone_and_the_batch_is_unchanged(reference, loop, scheduler):
    first = seq(reference, loop, QUESTIONS[0], tokens=8)
    scheduler._waiting = [first]
    scheduler._admit()
    scheduler._step()
    lengths = list(scheduler._batch.lengths)
    bad, good = seq(reference, loop, QUESTIONS[1], faults={"join"}), seq(reference, loop, QUESTIONS[2])
    scheduler._waiting = [bad, good]
    scheduler._admit()
    assert scheduler._batch.lengths[:1] == lengths and len(scheduler._running) == 2
    while scheduler._running:
        scheduler._step()
    got = received(loop, bad)
    assert isinstance(got[-1], RequestFailed) and "joining the running batch" in str(got[-1]) and len(got) == 2
    assert received(loop, first) == alone(reference, loop, QUESTIONS[0], tokens=8)
    assert received(loop, good) == alone(reference, loop, QUESTIONS[2])


def test_rows_that_cannot_leave_stay_ignored_and_leave_next_step(reference, loop, scheduler, caplog):
    short = seq(reference, loop, QUESTIONS[0], faults={"leave"}, tokens=2)
    long = seq(reference, loop, QUESTIONS[1], tokens=8)
    scheduler._waiting = [short, long]
    scheduler._admit()
    scheduler._step()  # short's second token: it ends, and its row fails to leave
    assert "rows could not leave the batch" in caplog.text and len(scheduler._running) == 2
    scheduler._step()  # it leaves now
    assert scheduler._running == [long] and len(scheduler._batch) == 1
    while scheduler._running:
        scheduler._step()
    assert received(loop, short) == alone(reference, loop, QUESTIONS[0], tokens=2)
    assert received(loop, long) == alone(reference, loop, QUESTIONS[1], tokens=8)


def test_remove_changes_nothing_when_it_fails(reference, loop, scheduler, monkeypatch):
    scheduler._waiting = [seq(reference, loop, q, tokens=8) for q in QUESTIONS]
    scheduler._admit()
    batch = scheduler._batch
    def state():
        return list(batch.pads), list(batch.lengths), [id(m) for m in batch.image_keys], id(batch.cache)

    before = state()

    def broken(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr("xinf_llama_vision.engines.transformers.batch.make_cache", broken)
    with pytest.raises(torch.OutOfMemoryError):
        batch.remove([1])
    assert state() == before
