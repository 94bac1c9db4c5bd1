"""Admission by memory (issue 21, item 3), step by step on the tiny checkpoint (real model, real batch):
the cache arithmetic equals the bytes the batch's tensors hold, a small budget is never exceeded
while every answer stays raw transformers' own, and a decode step that runs out of memory half-way
puts its newest rows back in the queue instead of ending them.

The scheduler's thread is stopped; the test calls its steps. The expected answers come from raw
transformers' ``generate`` (greedy, float32), never from the engine.
"""

from __future__ import annotations


import torch

from parity import BLUE, RED
from test_scheduler_faults import received
from xinf_llama_vision.engines.transformers.admission import Budget
from xinf_llama_vision.engines.transformers.batch import DecodeBatch, image_keys_mask, prefill
from xinf_llama_vision.engines.transformers.scheduler import Scheduler, Sequence
from xinf_llama_vision.errors import RequestFailed
from xinf_llama_vision.memory import Architecture, cache_bytes

#: Different prompts and images (and none), so that rows differ in length and in image keys.
CASES = [
    ("What is this?", [RED]), ("Describe the picture in a few words.", [BLUE]), ("Say something long.", []),
    ("Which colour is it?", [RED]), ("Two pictures: which is red?", [RED, BLUE]), ("Count to ten.", []),
]


def stopped(model, budget=None) -> Scheduler:
    s = Scheduler(model, max_num_seqs=16, budget=budget)
    s.close()  # the thread ends; the test runs the steps
    s._closed = False
    return s


def inputs_of(reference, question, images):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return reference.inputs(reference.render([{"role": "user", "content": content}], "01 Jan 2025"), images)


def eot(reference) -> int:
    return reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")


def make(reference, loop, question, images, tokens, faults=()):
    kwargs = {"max_new_tokens": tokens, "eos_token_id": [eot(reference)], "do_sample": False}
    return Sequence.create(reference.model, inputs_of(reference, question, images), kwargs, loop,
                           injected=frozenset(faults))


def raw(reference, question, images, tokens):
    """Raw transformers' greedy answer (token ids, the end-of-turn token included when it comes)."""
    x = inputs_of(reference, question, images)
    with torch.no_grad():
        out = reference.model.generate(**x, max_new_tokens=tokens, do_sample=False, eos_token_id=eot(reference),
                                       pad_token_id=eot(reference))
    return out[0, x["input_ids"].shape[1]:].tolist()


def run(s: Scheduler, seqs, watch=None):
    s._waiting = list(seqs)
    while s._waiting or s._running:
        s._cycle()  # what the scheduler's thread does, failures handled as there
        if watch:
            watch(s)


def test_the_cache_arithmetic_is_what_the_batch_holds(reference, loop):
    """memory.cache_bytes (estimate, launch check, admission) against the bytes of the batch's tensors:
    rows with one image, two images and none, of different lengths, after joins and steps."""
    model = reference.model
    arch = Architecture.from_config(model.config.to_dict())
    batch = DecodeBatch(model)
    for question, images in CASES[:5]:
        x = inputs_of(reference, question, images)
        (logits, layers, length), = prefill(model, [x])
        batch.add(layers, length, image_keys_mask(model, x.get("cross_attention_mask")))
        batch.step([1] * len(batch))
        expected = cache_bytes(arch, len(batch), batch.width, batch.image_width, model.dtype.itemsize)
        assert batch.held() == expected
    assert batch.image_width == 2 * arch.max_num_tiles * arch.tokens_per_tile  # the two-image row's


def budget_for(reference, rows: int, tokens: int) -> Budget:
    """A budget under which about ``rows`` one-image rows of ``tokens`` tokens fit together."""
    model = reference.model
    arch = Architecture.from_config(model.config.to_dict())
    b = Budget.of(arch, model.dtype.itemsize, 0)
    b.limit = 2 * b.need(rows, tokens, 2 * arch.max_num_tiles * arch.tokens_per_tile)
    return b


def test_a_small_budget_is_never_exceeded_and_every_answer_is_exact(reference, loop):
    """Twelve requests with long answers under a budget of about three rows: the batch's measured bytes
    (both copies while it is rebuilt) stay within the budget, rows are put back in the queue and come
    back, and every answer is raw transformers' own."""
    tokens = 48
    cases = CASES * 2
    budget = budget_for(reference, rows=3, tokens=70)
    s = stopped(reference.model, budget)
    seqs = [make(reference, loop, q, images, tokens) for q, images in cases]
    widths = []
    run(s, seqs, watch=lambda s: widths.append(len(s._running)))
    assert s._batch.peak <= budget.limit, (s._batch.peak, budget.limit)
    assert max(widths) >= 2 and sum(seq.requeued for seq in seqs) > 0  # the budget was what limited the batch
    for seq, (q, images) in zip(seqs, cases):
        assert received(loop, seq) == raw(reference, q, images, tokens)


def test_without_a_budget_the_same_flood_exceeds_it(reference, loop):
    """The budget above is one the flood would break: with no budget the batch measures more."""
    tokens = 48
    budget = budget_for(reference, rows=3, tokens=70)
    s = stopped(reference.model)
    run(s, [make(reference, loop, q, images, tokens) for q, images in CASES * 2])
    assert s._batch.peak > budget.limit


def test_a_decode_step_out_of_memory_puts_the_newest_rows_back(reference, loop, caplog):
    """The last text layer runs out of memory in a step of four rows (the earlier layers had grown the
    cache): the step is undone, the newest two rows go back to the queue, and all four answers are
    exact; the budget shrinks to what is left."""
    tokens = 12
    budget = budget_for(reference, rows=8, tokens=200)
    before = budget.limit
    s = stopped(reference.model, budget)
    seqs = [make(reference, loop, q, images, tokens, faults={"oom"} if i == 0 else ())
            for i, (q, images) in enumerate(CASES[:4])]
    run(s, seqs)
    assert "ran out of memory" in caplog.text and budget.limit < before
    assert [seq.requeued for seq in seqs] == [0, 0, 1, 1]
    for seq, (q, images) in zip(seqs, CASES[:4]):
        assert received(loop, seq) == raw(reference, q, images, tokens)


def test_out_of_memory_alone_fails_in_words(reference, loop):
    s = stopped(reference.model)
    one = make(reference, loop, *CASES[0], tokens=8, faults={"oom"})
    run(s, [one])
    got = received(loop, one)
    assert isinstance(got[-1], RequestFailed) and "decode step" in str(got[-1]) and len(got) == 3
