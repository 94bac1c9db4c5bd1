"""OpenAI request options through vLLM's own Mllama (V0 engine): the shared tests of :mod:`vllm_options`,
one engine at a time on a small machine."""

from __future__ import annotations

import pytest

from oracle import Raw
from vllm_options import *  # noqa: F401,F403 - the shared option tests, collected here


@pytest.fixture(scope="module")
def uid(server, vllm_launch):
    for other in ("vllm-base", "vllm-load"):  # one engine at a time on a small machine
        server.cli("terminate", "--model-uid", other, check=False)
    uid = vllm_launch("llama-3.2-vision-instruct", "vllm-options")
    yield uid
    server.cli("terminate", "--model-uid", uid, check=False)


@pytest.fixture(scope="module")
def separators():
    return None  # xgrammar's default without optional whitespace: ", " and ": "


@pytest.fixture(scope="module")
def raw(reference):
    return Raw(reference)


@pytest.fixture(scope="module")
def flat(server, uid, vllm_launch, tmp_path_factory):
    """``(uid, Raw)`` of a second model on a flatter-logit checkpoint (the first one stopped: one at a time)."""
    from oracle import Reference
    from tiny import build

    server.cli("terminate", "--model-uid", uid, check=False)
    path = build(str(tmp_path_factory.mktemp("flat-mllama")), head_scale=6.0)
    flat_uid = vllm_launch("llama-3.2-vision-instruct", "vllm-flat", path=path)
    yield flat_uid, Raw(Reference(path))
    server.cli("terminate", "--model-uid", flat_uid, check=False)
