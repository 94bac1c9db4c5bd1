"""The image cache (issue 24, item 1), step by step on the tiny checkpoint (real model, real batch):
requests about an image the cache holds run no vision tower (counted on the real vision model) and
answer exactly as raw transformers' ``generate``; images in several orders and rows come back in the
right place; the least recently used image goes first; scopes never share an entry.
"""

from __future__ import annotations

import contextlib

import torch


from oracle import png
from parity import BLUE, RED
from test_admission import inputs_of, raw, received
from xinf_llama_vision.engines.transformers.reuse import ReuseCache, image_keys
from xinf_llama_vision.engines.transformers.scheduler import Scheduler, Sequence

GREEN = png((20, 160, 40), size=(300, 300))

QUESTIONS = ["What is this?", "Which colour is it?", "Is it round?", "Describe it.", "Name its colour.",
             "What shape?", "Is it bright?", "Say one word.", "Is it dark?", "What do you see?", "Describe it again.",
             "Any text?", "How big?", "Is it red?", "Is it blue?", "One more question."]
TOKENS = 8


@contextlib.contextmanager
def vision_runs(model, projections=None):
    """Images through the vision tower while inside (counted by a hook on the real vision model); with
    a list ``projections``, the calls of every cross-attention layer's key and value projections too."""
    runs = []
    hooks = [model.model.vision_model.register_forward_hook(lambda m, args, kwargs, out: runs.append(
        kwargs["pixel_values"].shape[0] * kwargs["pixel_values"].shape[1]), with_kwargs=True)]
    if projections is not None:
        for index in model.config.text_config.cross_attention_layers:
            attn = model.model.language_model.layers[index].cross_attn
            hooks += [p.register_forward_hook(lambda *_: projections.append(1)) for p in (attn.k_proj, attn.v_proj)]
    try:
        yield runs
    finally:
        for hook in hooks:
            hook.remove()


def make(reference, loop, question, images, scope=""):
    x = inputs_of(reference, question, images)
    eot = reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    kwargs = {"max_new_tokens": TOKENS, "eos_token_id": [eot], "do_sample": False}
    return Sequence.create(reference.model, x, kwargs, loop, image_hashes=image_keys(x, scope))


def serve(reference, cache, seqs):
    s = Scheduler(reference.model, max_num_seqs=16, reuse=cache)
    s.close()
    s._closed = False
    s._waiting = list(seqs)
    while s._waiting or s._running:
        s._cycle()


def test_sixteen_questions_about_one_image_run_the_vision_tower_once(reference, loop):
    cache = ReuseCache(limit=1 << 30)
    projections = []
    with vision_runs(reference.model, projections) as runs:
        seqs = [make(reference, loop, q, [RED]) for q in QUESTIONS]
        serve(reference, cache, seqs)
        assert sum(runs) == 1  # one group of 16 rows, one image among them
        assert len(projections) == 2 * len(reference.model.config.text_config.cross_attention_layers)
        later = [make(reference, loop, q, [RED]) for q in QUESTIONS[:4]]
        serve(reference, cache, later)
        assert sum(runs) == 1  # all cached: no vision tower
        assert len(projections) == 2 * len(reference.model.config.text_config.cross_attention_layers)  # nor keys
    for seq, q in zip(seqs + later, QUESTIONS + QUESTIONS[:4]):
        assert received(loop, seq) == raw(reference, q, [RED], TOKENS)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.images) == (15 + 4, 1, 1)


def test_cached_images_come_back_in_their_places(reference, loop):
    """Rows with different images in one prefill group, and two-image prompts in both orders, all
    cached: each row gets its own images in its own order (the red and the blue rows answer
    differently, so a swap of rows would show)."""
    cache = ReuseCache(limit=1 << 30)
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


def assert_same_rows(got, want):
    for (logits, layers, length), (want_logits, want_layers, want_length) in zip(got, want, strict=True):
        assert length == want_length
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(layers, want_layers, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


def test_cached_keys_and_values_compute_what_the_vision_tower_gives(reference):
    """Numbers, not only tokens: rows whose images' cross-attention keys and values come from the cache
    (and their first token's self-attention from ``first_token_layers``) get the logits and every layer's
    keys and values that a prefill through the vision tower gives them (float32), two images in both
    orders. Fails without the key norm, with a row's images in the wrong order, and with the first
    token's keys taken from another token (each tried)."""
    from xinf_llama_vision.engines.transformers.batch import prefill

    model = reference.model
    group = [inputs_of(reference, "Which is first?", [RED, BLUE]), inputs_of(reference, "Which is first?", [BLUE, RED])]
    keys = [image_keys(x) for x in group]
    want = prefill(model, group)  # pixel values through the model, no cache
    cache = ReuseCache(limit=1 << 30)
    projections = []
    with vision_runs(model, projections) as runs:
        assert_same_rows(prefill(model, group, cache, keys), want)  # computed, kept, then used
        assert_same_rows(prefill(model, group, cache, keys), want)  # all from the cache
    assert sum(runs) == 2 and (cache.stats.hits, cache.stats.misses) == (6, 2)
    assert len(projections) == 2 * len(model.config.text_config.cross_attention_layers)  # once, for both images


def test_a_prompt_whose_first_token_sees_an_image_runs_the_vision_tower(reference):
    """The language model reads cached keys only after a first token: a prompt that starts with its
    image (no ``<|begin_of_text|>`` before it) is prefilled through the vision tower, exactly."""
    from xinf_llama_vision.engines.transformers.batch import prefill

    model = reference.model
    x = reference.inputs("<|image|>What is this?", [RED])
    assert x["cross_attention_mask"][0, 0].any()
    cache = ReuseCache(limit=1 << 30)
    prefill(model, [inputs_of(reference, "Warm.", [RED])], cache, [image_keys(x)])
    with vision_runs(model) as runs:
        assert_same_rows(prefill(model, [x], cache, [image_keys(x)]), prefill(model, [x]))
    assert sum(runs) == 2


def test_the_least_recently_used_image_goes_first(reference, loop):
    one = ReuseCache(limit=1 << 30)
    serve(reference, one, [make(reference, loop, "Warm.", [RED])])
    cache = ReuseCache(limit=one.stats.bytes * 3 // 2)  # room for one image and its prefix
    with vision_runs(reference.model) as runs:
        for images in ([RED], [BLUE], [BLUE], [RED]):  # red is gone when it comes back
            serve(reference, cache, [make(reference, loop, "What is this?", images)])
    assert sum(runs) == 3 and cache.stats.evictions >= 2 and (cache.stats.hits, cache.stats.misses) == (1, 3)


def test_scopes_never_share_an_entry(reference, loop):
    cache = ReuseCache(limit=1 << 30)
    seqs = [make(reference, loop, "What is this?", [RED], scope=scope) for scope in ("key a", "key b", "key a")]
    with vision_runs(reference.model) as runs:
        for seq in seqs:
            serve(reference, cache, [seq])
    assert sum(runs) == 2 and cache.stats.hits == 1
    want = raw(reference, "What is this?", [RED], TOKENS)
    assert all(received(loop, seq) == want for seq in seqs)


# -- the prefix cache ---------------------------------------------------------------------------
def conversation_inputs(reference, turns, image):
    """The processed prompt of a conversation: ``turns`` = [(question, answer or None)], the image in
    the first question (as a chat client resends it every turn)."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return reference.inputs(reference.render(messages, "01 Jan 2025"), [image])


def raw_ids(reference, x, tokens):
    eot = reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():
        out = reference.model.generate(**x, max_new_tokens=tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    return out[0, x["input_ids"].shape[1]:].tolist()


def sequence(reference, loop, x, tokens, scope=""):
    eot = reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    kwargs = {"max_new_tokens": tokens, "eos_token_id": [eot], "do_sample": False}
    return Sequence.create(reference.model, x, kwargs, loop, image_hashes=image_keys(x, scope), scope=scope)


def converse(reference, loop, cache, questions, image, tokens=12):
    """A conversation served turn by turn through the scheduler with ``cache``: each turn's answer ids
    and raw transformers' for the same prompt."""
    turns, got, want = [], [], []
    for question in questions:
        x = conversation_inputs(reference, turns + [(question, None)], image)
        seq = sequence(reference, loop, x, tokens)
        serve(reference, cache, [seq])
        ids = [t for t in received(loop, seq)]
        got.append(ids)
        want.append(raw_ids(reference, x, tokens))
        turns.append((question, reference.tokenizer.decode(ids, skip_special_tokens=True)))
    return got, want


QUESTIONS_6 = ["What is in this image?", "What colour is it?", "Is there any text?", "Describe its shape.",
               "Is it bright or dark?", "Summarise our conversation."]


def test_each_turn_reuses_the_conversation_so_far_and_answers_exactly(reference, loop):
    cache = ReuseCache(limit=1 << 30)
    got, want = converse(reference, loop, cache, QUESTIONS_6, RED)
    assert got == want
    assert cache.stats.prefix_hits == 5 and cache.stats.misses == 1  # turns 2 to 6 reuse; one vision tower run
    # Every later turn reused at least the whole first prompt and its answer.
    first = conversation_inputs(reference, [(QUESTIONS_6[0], None)], RED)["input_ids"].shape[1]
    assert cache.stats.reused >= 5 * first


def test_a_cached_prefix_joins_a_running_batch_exactly(reference, loop):
    """Turn 2 of one conversation starts from its cached prefix while other requests are decoding."""
    cache = ReuseCache(limit=1 << 30)
    got, _ = converse(reference, loop, cache, QUESTIONS_6[:1], BLUE)
    turns = [(QUESTIONS_6[0], reference.tokenizer.decode(got[0], skip_special_tokens=True)), (QUESTIONS_6[1], None)]
    x = conversation_inputs(reference, turns, BLUE)
    others = [make(reference, loop, q, [RED]) for q in QUESTIONS[:3]]
    s = Scheduler(reference.model, max_num_seqs=16, reuse=cache)
    s.close()
    s._closed = False
    s._waiting = list(others)
    s._cycle()
    s._cycle()  # the others are running
    follow = sequence(reference, loop, x, 12)
    s._waiting.append(follow)
    hits = cache.stats.prefix_hits
    while s._waiting or s._running:
        s._cycle()
    assert cache.stats.prefix_hits == hits + 1
    assert received(loop, follow) == raw_ids(reference, x, 12)
    for seq, q in zip(others, QUESTIONS[:3]):
        assert received(loop, seq) == raw(reference, q, [RED], TOKENS)


def test_prefixes_are_scoped_and_evicted_safely(reference, loop):
    """Another scope never reuses a conversation's prefix; a budget of about one entry evicts while
    the conversations go on, and every answer stays exact."""
    cache = ReuseCache(limit=1 << 30)
    converse(reference, loop, cache, QUESTIONS_6[:1], RED)
    size = cache.stats.bytes
    x = conversation_inputs(reference, [(QUESTIONS_6[0], None)], RED)
    other = sequence(reference, loop, x, 12, scope="someone else")
    hits = cache.stats.prefix_hits
    serve(reference, cache, [other])
    assert cache.stats.prefix_hits == hits
    # The same words about another picture: its tokens after the image are not the cached ones'.
    blue = conversation_inputs(reference, [(QUESTIONS_6[0], None)], BLUE)
    served = sequence(reference, loop, blue, 12)
    serve(reference, cache, [served])
    assert cache.stats.prefix_hits == hits and received(loop, served) == raw_ids(reference, blue, 12)
    small = ReuseCache(limit=size * 2)
    got, want = converse(reference, loop, small, QUESTIONS_6[:4], GREEN)
    assert got == want and small.stats.evictions > 0


def test_a_prefill_after_a_cached_prefix_computes_what_a_whole_prefill_computes(reference):
    """Numbers, not only tokens: the logits and every layer's keys and values of a prompt prefilled
    after its first tokens' cached keys and values equal a whole prefill's (float32). A position off by
    one keeps the tiny model's greedy tokens but not these (tried)."""
    from xinf_llama_vision.engines.transformers.batch import prefill, prefill_from

    model = reference.model
    x = conversation_inputs(reference, [(QUESTIONS_6[0], "A red square."), (QUESTIONS_6[1], None)], RED)
    (whole_logits, whole, length), = prefill(model, [x])
    n = length - 9
    head = {k: v[:, :n] for k, v in x.items() if k in ("input_ids", "attention_mask", "cross_attention_mask")}
    head.update({k: x[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")})
    (_, first, _), = prefill(model, [head])
    cross = set(model.config.text_config.cross_attention_layers)
    prefix = [None if i in cross else kv for i, kv in enumerate(first)]
    cache = ReuseCache(limit=1 << 30)
    logits, layers, total = prefill_from(model, x, n, prefix, cache, image_keys(x))
    assert total == length
    torch.testing.assert_close(logits, whole_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(layers, whole):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


# -- pictures sent again ------------------------------------------------------------------------
def test_inputs_from_known_pictures_are_the_processors(reference):
    """A prompt built from pictures processed one by one before (``reuse.processed``) is exactly what
    the processor makes of the prompt and its images together: no image, one of 1 or 4 tiles, two in
    both orders (tile counts differ, so a swapped mask shows)."""
    from xinf_llama_vision.engines.transformers.reuse import picture, processed

    wide, small = png((200, 30, 30), size=(900, 300)), png((20, 40, 220), size=(100, 100))
    cases = [("Hello.", []), ("What is this?", [wide]), ("What is this?", [small]), ("Which is first?", [wide, small]),
             ("Which is first?", [small, wide])]
    for question, images in cases:
        if images:
            text = reference.render([{"role": "user", "content": [{"type": "image"} for _ in images] +
                                      [{"type": "text", "text": question}]}], "01 Jan 2025")
        else:
            text = reference.render([{"role": "user", "content": question}], "01 Jan 2025")
        want = reference.inputs(text, images)
        got = processed(reference.processor, text, [picture(reference.processor, im, "s") for im in images])
        assert sorted(got) == sorted(want.keys())
        for name in want:
            assert torch.equal(got[name], want[name]), (question, len(images), name)
    assert picture(reference.processor, wide, "s").tiles != picture(reference.processor, small, "s").tiles


def test_a_picture_sent_again_is_not_processed_again():
    from xinf_llama_vision.engines.transformers.reuse import KnownPictures

    known = KnownPictures(size=2)
    made = []

    def get(scope, data):
        digest, found = known.find(scope, data)
        if found is None:
            made.append(data)
            found = known.keep(digest, object())
        return found

    a = get("s", b"one")
    assert get("s", b"one") is a and made == [b"one"]
    assert get("t", b"one") is not a  # another scope: its own
    get("s", b"two")  # a third entry: the oldest ("s", "one"),  is gone
    get("s", b"one")
    assert made == [b"one", b"one", b"two", b"one"]
