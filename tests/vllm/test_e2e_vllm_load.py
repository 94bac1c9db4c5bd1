"""Concurrent streams through ``--model-engine vllm``: the load cases of the Transformers engine
(:mod:`load`) that one image per prompt allows, eight streams at once, clients hanging up among them.

Every stream must finish, with the usage and finish reason of raw transformers' answer. The text
is compared only for its first token: vLLM 0.9.2's V0 batches do not give each request its
unbatched answer. Measured: two identical "image, streamed" requests in one batch of 8 answered
differently from each other at their 3rd token, where raw transformers' top two logits are more
than 0.5 apart (so not rounding at a near tie); in other runs at a near tie (its 10th token), and
in the stop-string case. The Transformers engine's load test compares whole answers; the V1
model (our own) will be held to that.
"""

from __future__ import annotations

import pytest

from load import CASES, expected_answers, load_round, tokens_far_from_ties

NAMES = [name for name in CASES if name != "two images, streamed"]  # vLLM's default: one image per prompt
MARGIN = 0.5  # logits


@pytest.fixture(scope="module")
def vllm_chat(server, vllm_launch):
    server.cli("terminate", "--model-uid", "vllm-base", check=False)  # one engine at a time
    uid = vllm_launch("llama-3.2-vision-instruct", "vllm-load")
    yield uid
    server.cli("terminate", "--model-uid", uid, check=False)


def test_8_concurrent_streams_through_vllm_all_finish(server, vllm_chat, reference):
    lengths = {name: tokens_far_from_ties(reference, name, MARGIN) for name in NAMES if name != "hang-up"}
    # The stop-string case is sent but not compared: vLLM's answer to it differed in 2 of ~8 runs
    # (not reproduced with its text printed; equal in every run that printed it).
    compared = {name for name, n in lengths.items() if n >= 2 and name != "wide image, stop string"}
    assert len(compared) >= 2, lengths
    max_tokens = {name: lengths[name] for name in compared}
    expected = expected_answers(reference, max_tokens)
    results = load_round(server, vllm_chat, expected, NAMES, n=8, stream=True)
    assert len(results) == 8
    first = expected_answers(reference, {name: 1 for name in compared})
    for name, text, usage, finish in results:
        assert name == "hang-up" or text is not None, name
        if name in compared:
            want = expected[name]
            assert (finish, usage) == (want.finish_reason, (want.prompt_tokens, want.completion_tokens)), name
            assert text.startswith(first[name].text.rstrip("\ufffd")), (name, text, want.text)
