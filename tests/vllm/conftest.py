"""The vLLM stage (``scripts/test-vllm.sh``): vLLM's own Mllama (V0 engine) in ``.venv-vllm``.

The main test run does not collect this directory (``--ignore=tests/vllm`` in pyproject's
addopts); here every test must run: a skip fails the stage.
"""

from __future__ import annotations

import pytest

from vllm_stage import fail_on_skips, launcher, require_line


def pytest_sessionstart(session):
    require_line("v0", "vLLM >= 0.6.3, <= 0.10.2")


def pytest_sessionfinish(session, exitstatus):
    fail_on_skips(session)


@pytest.fixture(scope="session")
def vllm_launch(server, tiny_checkpoint):
    """``vllm_launch(model_name, uid, *options, path=tiny checkpoint)``: launch on ``--model-engine vllm``
    and wait until it answers."""
    return launcher(server, tiny_checkpoint)
