"""Fixtures: a tiny real checkpoint, a real ``xinference-local``, and launches through the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

BIN = Path(sys.executable).parent
EXTENSION = "xinf_llama_vision.extension:create"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict:
    env = dict(os.environ)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(
        XINFERENCE_HOME=str(home),
        TMPDIR=str(home / "tmp"),  # the server's own temporary directory, which tests can watch
        XINFERENCE_AUTH_ADVANCED="false",
        XINFERENCE_EXTENSIONS=EXTENSION,
        XINFERENCE_DISABLE_METRICS="1",
        HF_HUB_OFFLINE="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


class Server:
    """A real Xinference process tree on loopback, stopped with its whole process group."""

    def __init__(self, args, env, log: Path, endpoint: str):
        self.endpoint = endpoint
        self.env = env
        self.log = log
        self.home = env["XINFERENCE_HOME"]
        self.tmpdir = env["TMPDIR"]
        #: With Xinference's auth on: the admin's token (launches, the CLI) and a client's ``xf-`` key (requests).
        self.admin_token: Optional[str] = None
        self.api_key: Optional[str] = None
        self.proc = subprocess.Popen(
            args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, path="/v1/models", timeout=180):
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + path, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def cli(self, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
        credential = ["--api-key", self.admin_token] if self.admin_token and args[0] in ("launch", "terminate") else []
        result = subprocess.run(
            [str(BIN / "xinference"), *args, "-e", self.endpoint, *credential],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"xinference {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def launch(self, model_name: str, uid: str, model_path: str, *extra: str) -> str:
        self.cli("launch", "--model-name", model_name, "--model-engine", "transformers",
                 "--model_path", model_path, "--model-uid", uid, *extra)
        return uid

    def post(self, path: str, body: dict, timeout: float = 300):
        """A raw HTTP POST: ``(status, parsed JSON or SSE text)``, for exact status codes."""
        import httpx

        # ASCII JSON, so that any string (a lone surrogate too) travels as the \\uXXXX escape a client would send
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        response = httpx.post(self.endpoint + path, content=json.dumps(body).encode(), timeout=timeout, headers=headers)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text

    def rss(self) -> int:
        """Resident memory of the server's whole process tree (model processes included), in bytes."""
        import psutil

        total = 0
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.endpoint + "/v1", api_key=self.api_key or "not-used", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def launched(server, tiny_checkpoint):
    """``launched(model_name, *launch options)`` → model uid; each distinct launch happens once a session.

    Xinference's per-model virtualenv mode is its default; pass ``"--disable-virtual-env"`` to turn it off.
    """
    uids: dict = {}

    def launch(model_name: str, *extra: str) -> str:
        key = (model_name, extra)
        if key not in uids:
            uid = f"{model_name}-{len(uids)}".replace(".", "-")
            uids[key] = server.launch(model_name, uid, tiny_checkpoint, *extra)
        return uids[key]

    return launch


@pytest.fixture(scope="session")
def chat_uid(launched):
    """The instruct family, launched once (without Xinference's virtualenv); modules may override."""
    return launched("llama-3.2-vision-instruct", "--disable-virtual-env")


@pytest.fixture(scope="session")
def base_uid(launched):
    """The base family, launched once (without Xinference's virtualenv); modules may override."""
    return launched("llama-3.2-vision", "--disable-virtual-env")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from tiny import build

    return build(str(tmp_path_factory.mktemp("tiny-mllama")))


@pytest.fixture
def loop():
    """An event loop of its own, for tests that drive the scheduler's steps by hand."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from oracle import Reference

    return Reference(tiny_checkpoint)


def start_local(home: Path, env: dict, bin_dir: Path = BIN) -> Server:
    """``xinference-local`` (of the environment ``bin_dir``, default this one) on a free loopback port with
    ``env``, its log in ``home`` (started, maybe not ready)."""
    port = free_port()
    return Server([str(bin_dir / "xinference-local"), "-H", "127.0.0.1", "-p", str(port)], env, home / "server.log",
                  f"http://127.0.0.1:{port}")


@contextlib.contextmanager
def serving(home: Path, env: dict):
    """:func:`start_local`, ready to answer; stopped on the way out."""
    srv = start_local(home, env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("xinference-home")
    try:
        with serving(home, base_env(home)) as srv:
            yield srv
    finally:
        if os.environ.get("XLV_KEEP_LOGS"):
            shutil.copy(home / "server.log", os.environ["XLV_KEEP_LOGS"])


@pytest.fixture(scope="session")
def bare_server(tmp_path_factory):
    """The same Xinference without the plugin: what the server answers when the plugin is not there."""
    home = tmp_path_factory.mktemp("xinference-bare")
    env = base_env(home)
    env.pop("XINFERENCE_EXTENSIONS")
    with serving(home, env) as srv:
        yield srv


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The fuzz report (outcome histograms collected by tests/test_fuzz.py), visible in CI logs."""
    reports = getattr(config, "xlv_fuzz_reports", [])
    if reports:
        terminalreporter.write_sep("=", "fuzz report")
        for title, cases, histogram in reports:
            terminalreporter.write_line(f"{title}: {cases} cases; {histogram}")
