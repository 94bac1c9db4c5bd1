"""Concurrent streams through ``--model-engine vllm``: the load cases of the Transformers engine
(:mod:`load`) that one image per prompt allows, eight at a time, each equal to raw transformers."""

from __future__ import annotations

import pytest

from load import CASES, check, expected_answers, load_round

NAMES = [name for name in CASES if name != "two images, streamed"]  # vLLM's default: one image per prompt


@pytest.fixture(scope="module")
def vllm_chat(server, vllm_launch):
    server.cli("terminate", "--model-uid", "vllm-base", check=False)  # one engine at a time
    uid = vllm_launch("llama-3.2-vision-instruct", "vllm-load")
    yield uid
    server.cli("terminate", "--model-uid", uid, check=False)


def test_8_concurrent_streams_through_vllm_equal_raw_transformers(server, vllm_chat, reference):
    expected = expected_answers(reference)
    results = load_round(server, vllm_chat, NAMES, n=8, stream=True)
    assert len(results) == 8
    check(results, expected)
