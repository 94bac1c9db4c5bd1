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


def launch(server, model_name: str, uid: str, model_path: str, *extra: str) -> str:
    # float32 like the reference; vLLM would otherwise halve a float32 checkpoint's precision.
    server.cli("launch", "--model-name", model_name, "--model-engine", "vllm", "--model_path", model_path,
               "--model-uid", uid, "--disable-virtual-env", "--dtype", "float32", *extra)
    wait_ready(server, uid)
    import httpx

    described = httpx.get(f"{server.endpoint}/v1/models/{uid}", timeout=30).json()
    assert described["model_engine"].lower() == "vllm", described
    return uid


def wait_ready(server, uid: str, timeout: float = 300) -> None:
    """``xinference launch`` returns while vLLM still loads (503 "Model is loading"): wait for it."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        response = httpx.post(f"{server.endpoint}/v1/completions", timeout=60,
                              json={"model": uid, "prompt": "Hi", "max_tokens": 1})
        if response.status_code == 200:
            return
        if response.status_code != 503:
            raise AssertionError(f"{uid}: HTTP {response.status_code} {response.text}\n{server.log.read_text()[-4000:]}")
        time.sleep(2)
    raise TimeoutError(f"{uid} not ready after {timeout}s:\n{server.log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def vllm_launch(server, tiny_checkpoint):
    """``vllm_launch(model_name, uid, *options, path=tiny checkpoint)``: launch on ``--model-engine vllm``
    and wait until it answers."""
    return lambda model_name, uid, *extra, path=tiny_checkpoint: launch(server, model_name, uid, path, *extra)
