"""Concurrent mixed streams through our V1 model: the load cases of every engine (:mod:`load`), two
images per prompt included, 16 at once with clients hanging up among them. Unlike vLLM's own V0
Mllama (see ``tests/vllm/test_e2e_vllm_load.py``), every answer must equal its unbatched raw
transformers answer in full, with its usage and finish reason.
"""

from __future__ import annotations

from load import CASES, check, expected_answers, load_round, run


def test_16_concurrent_mixed_streams_each_equal_their_solo_answer(server, chat_uid, reference):
    expected = expected_answers(reference)
    solo = {name: run(server, chat_uid, name, expected[name].options) for name in expected}
    check(solo.values(), expected)  # alone first: each answer is raw transformers'
    for stream in (True, False):
        results = load_round(server, chat_uid, expected, list(CASES), n=16, stream=stream)
        assert len(results) == 16
        check(results, expected)  # the hang-ups among them changed nobody's answer
    assert run(server, chat_uid, "text only", expected["text only"].options)[1] == expected["text only"].text


def test_staggered_arrivals_with_hang_ups_each_equal_their_solo_answer(server, chat_uid, reference):
    """Churn: 24 requests (0 to 2 images of different tile counts, stop strings, clients that hang up) arriving
    one every 0.15 s, so rows join and leave the running batch at every step and the encoder outputs
    of different requests are paired with their rows while others come and go: every answer read to
    the end equals raw transformers' unbatched answer."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    expected = expected_answers(reference)
    names = [list(CASES)[i % len(CASES)] for i in range(24)]

    def later(i, name):
        time.sleep(0.15 * i)
        return run(server, chat_uid, name, getattr(expected.get(name), "options", None))

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(later, range(len(names)), names))
    check(results, expected)
    assert sum(1 for r in results if r[0] == "hang-up") == 4
