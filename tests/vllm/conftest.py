"""The vLLM stage (``scripts/test-vllm.sh``): runs in ``.venv-vllm`` beside a real vLLM.

The main test run does not collect this directory (``--ignore=tests/vllm`` in pyproject's
addopts); here every test must run: a skip fails the stage.
"""

from __future__ import annotations

import pytest


def pytest_sessionstart(session):
    import importlib.metadata

    from xinf_llama_vision.engines.vllm import installed_vllm, supports_mllama

    found = installed_vllm()
    if found is None or not supports_mllama(found[1]):
        raise pytest.UsageError(f"the vLLM stage needs vLLM >= 0.6.3, <= 0.10.2 installed; found {found}")
    print(f"vLLM stage: {found[0]} {found[1]}, xinference {importlib.metadata.version('xinference')}")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"vLLM stage: {len(skipped)} test(s) skipped; every test must run here", red=True)
