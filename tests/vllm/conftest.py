"""The vLLM stage (``scripts/test-vllm.sh``): vLLM's own Mllama (V0 engine) in ``.venv-vllm``.

The main test run does not collect this directory (``--ignore=tests/vllm`` in pyproject's
addopts); here every test must run: a skip fails the stage.
"""

from __future__ import annotations

from vllm_stage import pytest_sessionfinish, require_line, vllm_launch  # noqa: F401 - the stage's hook and fixture


def pytest_sessionstart(session):
    require_line("v0", "vLLM >= 0.6.3, <= 0.10.2")
