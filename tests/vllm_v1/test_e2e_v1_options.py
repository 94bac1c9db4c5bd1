"""OpenAI request options through this plugin's Mllama on vLLM's V1 engine: the shared tests of
:mod:`vllm_options` (``n``, ``seed``, ``response_format`` with compact JSON, ``logprobs`` and
``top_logprobs`` under sampling, penalties, refusals) on the stage's chat model; stop strings are
among the parity tests (``test_e2e_v1``)."""

from __future__ import annotations

import pytest

from oracle import Raw
from vllm_options import *  # noqa: F401,F403 - the shared option tests, collected here


@pytest.fixture(scope="module")
def uid(chat_uid):
    return chat_uid


@pytest.fixture(scope="module")
def separators():
    return (",", ":")  # vLLM 0.32 compiles JSON with these when whitespace is off


@pytest.fixture(scope="module")
def raw(reference):
    return Raw(reference)


@pytest.fixture(scope="module")
def flat(server, vllm_launch, tmp_path_factory):
    """``(uid, Raw)`` of a second model on a flatter-logit checkpoint, stopped after these tests."""
    from oracle import Reference
    from tiny import build

    path = build(str(tmp_path_factory.mktemp("flat-mllama")), head_scale=6.0)
    flat_uid = vllm_launch("llama-3.2-vision-instruct", "v1-flat", path=path)
    yield flat_uid, Raw(Reference(path))
    server.cli("terminate", "--model-uid", flat_uid, check=False)
