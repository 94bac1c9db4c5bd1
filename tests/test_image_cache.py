"""The image cache (issue 24, item 1), step by step on the tiny checkpoint (real model, real batch):
requests about an image the cache holds run no vision tower (counted on the real vision model) and
answer exactly as raw transformers' ``generate``; images in several orders and rows come back in the
right place; the least recently used image goes first; scopes never share an entry.
"""

from __future__ import annotations

import contextlib


from parity import BLUE, RED
from test_admission import inputs_of, raw, received
from xinf_llama_vision.engines.transformers.image_cache import ImageCache, image_keys
from xinf_llama_vision.engines.transformers.scheduler import Scheduler, Sequence

QUESTIONS = ["What is this?", "Which colour is it?", "Is it round?", "Describe it.", "Name its colour.",
             "What shape?", "Is it bright?", "Say one word.", "Is it dark?", "What do you see?", "Describe it again.",
             "Any text?", "How big?", "Is it red?", "Is it blue?", "One more question."]
TOKENS = 8


@contextlib.contextmanager
def vision_runs(model):
    """Images through the vision tower while inside (counted by a hook on the real vision model)."""
    runs = []
    hook = model.model.vision_model.register_forward_hook(lambda m, args, kwargs, out: runs.append(
        kwargs["pixel_values"].shape[0] * kwargs["pixel_values"].shape[1]), with_kwargs=True)
    try:
        yield runs
    finally:
        hook.remove()


def make(reference, loop, question, images, scope=""):
    x = inputs_of(reference, question, images)
    eot = reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    kwargs = {"max_new_tokens": TOKENS, "eos_token_id": [eot], "do_sample": False}
    return Sequence.create(reference.model, x, kwargs, loop, image_hashes=image_keys(x, scope))


def serve(reference, cache, seqs):
    s = Scheduler(reference.model, max_num_seqs=16, images=cache)
    s.close()
    s._closed = False
    s._waiting = list(seqs)
    while s._waiting or s._running:
        s._cycle()


def test_sixteen_questions_about_one_image_run_the_vision_tower_once(reference, loop):
    cache = ImageCache(limit=1 << 30)
    with vision_runs(reference.model) as runs:
        seqs = [make(reference, loop, q, [RED]) for q in QUESTIONS]
        serve(reference, cache, seqs)
        assert sum(runs) == 1  # one group of 16 rows, one image among them
        later = [make(reference, loop, q, [RED]) for q in QUESTIONS[:4]]
        serve(reference, cache, later)
        assert sum(runs) == 1  # all cached: no vision tower
    for seq, q in zip(seqs + later, QUESTIONS + QUESTIONS[:4]):
        assert received(loop, seq) == raw(reference, q, [RED], TOKENS)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.entries) == (15 + 4, 1, 1)


def test_cached_images_come_back_in_their_places(reference, loop):
    """Rows with different images in one prefill group, and two-image prompts in both orders, all
    cached: each row gets its own images in its own order (the red and the blue rows answer
    differently, so a swap of rows would show)."""
    cache = ImageCache(limit=1 << 30)
    serve(reference, cache, [make(reference, loop, "Warm.", [RED, BLUE])])
    cases = [("What is this?", [RED]), ("What is this?", [BLUE]), ("Which is first?", [RED, BLUE]),
             ("Which is first?", [BLUE, RED])]
    with vision_runs(reference.model) as runs:
        seqs = [make(reference, loop, q, images) for q, images in cases]
        serve(reference, cache, seqs)
    assert sum(runs) == 0
    answers = [received(loop, seq) for seq in seqs]
    assert answers == [raw(reference, q, images, TOKENS) for q, images in cases]
    assert answers[0] != answers[1]


def test_the_least_recently_used_image_goes_first(reference, loop):
    one = ImageCache(limit=1 << 30)
    serve(reference, one, [make(reference, loop, "Warm.", [RED])])
    cache = ImageCache(limit=one.stats.bytes * 3 // 2)  # room for one image
    with vision_runs(reference.model) as runs:
        for images in ([RED], [BLUE], [BLUE], [RED]):
            serve(reference, cache, [make(reference, loop, "What is this?", images)])
    assert sum(runs) == 3 and cache.stats.evictions == 2 and (cache.stats.hits, cache.stats.misses) == (1, 3)


def test_scopes_never_share_an_entry(reference, loop):
    cache = ImageCache(limit=1 << 30)
    seqs = [make(reference, loop, "What is this?", [RED], scope=scope) for scope in ("key a", "key b", "key a")]
    with vision_runs(reference.model) as runs:
        for seq in seqs:
            serve(reference, cache, [seq])
    assert sum(runs) == 2 and cache.stats.hits == 1
    want = raw(reference, "What is this?", [RED], TOKENS)
    assert all(received(loop, seq) == want for seq in seqs)
