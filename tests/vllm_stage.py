"""What both vLLM stages share (``tests/vllm``: vLLM's own Mllama on V0; ``tests/vllm_v1``: ours on V1):
every test must run, and launches through the real CLI that wait until the model answers. Each stage's
conftest imports the hook and fixture and checks its own vLLM line with :func:`require_line`."""

from __future__ import annotations

import pytest


def sent_by_compact_json(params):
    """The sampling params an engine wrapped by ``compat/vllm_engine.compact_json`` hands vLLM for ``params``."""
    from xinf_llama_vision.compat import vllm_engine

    seen = []
    engine = type("Engine", (), {"generate": lambda self, prompt, sampling_params, *a, **k: seen.append(sampling_params)})()
    engine.generate = engine.generate.__get__(engine)
    vllm_engine.compact_json(engine)
    engine.generate("p", params)
    return seen[0]


def require_line(line: str, what: str) -> None:
    """Refuse to run a stage beside the wrong vLLM (``line``: :func:`~xinf_llama_vision.engines.vllm.mllama_line`)."""
    import importlib.metadata

    from xinf_llama_vision.engines.vllm import installed_vllm, mllama_line

    found = installed_vllm()
    if found is None or mllama_line(found[1]) != line:
        raise pytest.UsageError(f"this stage needs {what} installed; found {found}")
    print(f"vLLM stage ({line}): {found[0]} {found[1]}, xinference {importlib.metadata.version('xinference')}")


def pytest_sessionfinish(session, exitstatus):
    """A skip fails the stage (a stage's conftest imports this hook)."""
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
    and wait until it answers (a stage's conftest imports this fixture)."""
    return lambda model_name, uid, *extra, path=tiny_checkpoint: launch(server, model_name, uid, path, *extra)
