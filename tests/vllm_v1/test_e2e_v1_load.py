"""Concurrent mixed streams through our V1 model: the load cases of every engine (:mod:`load`), two
images per prompt included, 16 at once with clients hanging up among them. Unlike vLLM's own V0
Mllama (see ``tests/vllm/test_e2e_vllm_load.py``), every answer must equal its unbatched raw
transformers answer in full, with its usage and finish reason.
"""

from __future__ import annotations

from load import CASES, abort_midway, check, expected_answers, load_round, run


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
    """Churn: 24 requests (0 to 2 images of different tile counts, stop strings, clients that hang up,
    streams aborted by their request id) arriving one every 0.15 s, so rows join and leave the running
    batch at every step and the encoder outputs of different requests are paired with their rows while
    others come and go: every answer read to the end equals raw transformers' unbatched answer, and
    every abort ends its stream."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    expected = expected_answers(reference)
    names = [list(CASES)[i % len(CASES)] for i in range(24)]

    def later(i, name):
        time.sleep(0.15 * i)
        if i % 8 == 2:
            return "aborted", abort_midway(server, chat_uid, f"churn-abort-{i}")
        return run(server, chat_uid, name, getattr(expected.get(name), "options", None))

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(later, range(len(names)), names))
    aborted = [r[1] for r in results if r[0] == "aborted"]
    check([r for r in results if r[0] != "aborted"], expected)
    assert sum(1 for r in results if r[0] == "hang-up") == 4
    # Each abort that Xinference's vLLM path found (DONE) ended its stream there, not at max_tokens, and is
    # done with (NOT_FOUND when sent again); every stream ended. Xinference does not always find the
    # client's request id (docs/reliability.md: 0 to 2 of 3 found, run to run), so none is required.
    assert len(aborted) == 3 and all(first in ({"msg": "DONE"}, {"msg": "NOT_FOUND"}) for first, _, _ in aborted)
    assert all(ended == "abort" and again == {"msg": "NOT_FOUND"}
               for first, again, ended in aborted if first == {"msg": "DONE"}), aborted
