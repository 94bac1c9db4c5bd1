"""Gated, missing and unreachable weights: a launch without ``--model_path`` says what to do.

Unit tests map huggingface_hub's real exceptions (raised by its own ``hf_raise_for_status`` on real
``httpx`` responses) to messages. The end-to-end test launches through the real CLI on a real
``xinference-local`` whose ``HF_ENDPOINT`` is a local fake hub on loopback (answering as the Hub
does for a gated and for a missing repository), and then a closed port (unreachable): nothing
leaves the machine.
"""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest
from huggingface_hub import errors as hf
from huggingface_hub.utils import hf_raise_for_status

from conftest import base_env, free_port, serving
from xinf_llama_vision.errors import WeightsUnavailable
from xinf_llama_vision.weights import explain

REPO = "meta-llama/Llama-3.2-11B-Vision-Instruct"
PAGE = f"https://huggingface.co/{REPO}"


def hub_error(status: int, code: str = None) -> Exception:
    """The exception huggingface_hub itself raises for a Hub answer ``status`` / ``X-Error-Code``."""
    request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}/revision/main")
    headers = {"X-Error-Code": code} if code else {}
    response = httpx.Response(status, headers=headers, request=request, text="")
    try:
        hf_raise_for_status(response)
    except Exception as e:
        return e
    raise AssertionError("no error raised")


def as_xinference_raises(error: Exception) -> RuntimeError:
    """What Xinference's ``retry_download`` raises after its retries: a generic error chained to the cause."""
    try:
        raise RuntimeError("Failed to download model 'llama-3.2-vision-instruct' after multiple retries") from error
    except RuntimeError as e:
        return e


def test_gated_repository():
    error = hub_error(403, "GatedRepo")
    assert isinstance(error, hf.GatedRepoError)
    for e in (error, as_xinference_raises(error)):
        message = explain(e, "llama-3.2-vision-instruct", REPO)
        assert "gated" in message and "accept" in message.lower()
        assert PAGE in message and "HF_TOKEN" in message and "--model_path" in message


def test_gated_without_a_token_401():
    error = hub_error(401, "GatedRepo")
    assert isinstance(error, hf.GatedRepoError)
    assert "the repository is gated" in explain(error, "m", REPO)


@pytest.mark.parametrize("status,code", [(404, "RepoNotFound"), (401, None)], ids=["404", "401-no-code"])
def test_repository_not_found(status, code):
    error = hub_error(status, code)
    assert isinstance(error, hf.RepositoryNotFoundError) and not isinstance(error, hf.GatedRepoError)
    message = explain(as_xinference_raises(error), "llama-3.2-vision", REPO)
    assert "was not found" in message
    assert "HF_TOKEN" in message and "--model_path" in message and PAGE in message


def test_revision_not_found():
    message = explain(hub_error(404, "RevisionNotFound"), "m", REPO)
    assert "revision does not exist" in message and "--model_path" in message


def test_unreachable_hub():
    try:
        httpx.get(f"http://127.0.0.1:{free_port()}/", timeout=5)
    except httpx.ConnectError as connect:
        try:
            raise hf.LocalEntryNotFoundError("cannot find the snapshot folder") from connect
        except hf.LocalEntryNotFoundError as e:
            error = e
    message = explain(as_xinference_raises(error), "m", REPO)
    assert "unreachable" in message and "--model_path" in message and "HF_TOKEN" in message


def test_other_failures_still_say_what_to_do():
    message = explain(as_xinference_raises(PermissionError("disk is read-only")), "m", REPO)
    assert "PermissionError: disk is read-only" in message
    assert "--model_path" in message and "HF_TOKEN" in message


# -- over the real CLI ---------------------------------------------------------------------


class FakeHub:
    """A loopback HTTP server that answers every Hub call as the Hub does for ``mode``."""

    ANSWERS = {
        "gated": (403, "GatedRepo", f"Access to model {REPO} is restricted. You must have access to it."),
        "not_found": (404, "RepoNotFound", "Repository Not Found"),
    }

    def __init__(self):
        hub = self
        self.mode = "gated"
        self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.paths.append(self.path)
                status, code, message = hub.ANSWERS[hub.mode]
                body = ('{"error": "%s"}' % message).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        """After this the port is closed: connections are refused."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    hub = FakeHub()
    home = tmp_path_factory.mktemp("xinference-weights")
    env = base_env(home)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "XINFERENCE_MODEL_SRC"):
        env.pop(name, None)
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{hub.port}",
        HF_HOME=str(home / "hf"),  # no cached token, no cached weights
        XINFERENCE_MODEL_SRC="huggingface",  # no auto-detection (it would probe other hubs off the machine)
        XINFERENCE_DOWNLOAD_MAX_ATTEMPTS="1",
    )
    try:
        with serving(home, env) as server:
            yield server, hub
    finally:
        hub.close()


def launch_without_weights(server, uid):
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "transformers",
                        "--disable-virtual-env", "--model-uid", uid, timeout=240, check=False)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def test_launch_without_weights_says_what_to_do(hub_server):
    server, hub = hub_server

    hub.mode = "gated"
    rc, output = launch_without_weights(server, "gated")
    assert rc != 0
    assert any(REPO in p for p in hub.paths), hub.paths  # it really asked the (fake) hub for Meta's repository
    assert "the repository is gated" in output, output
    assert PAGE in output and "HF_TOKEN" in output and "--model_path DIR" in output

    hub.mode = "not_found"
    rc, output = launch_without_weights(server, "missing")
    assert rc != 0
    assert "the repository was not found" in output, output
    assert "--model_path DIR" in output

    hub.close()  # now HF_ENDPOINT points at a closed port
    rc, output = launch_without_weights(server, "offline")
    assert rc != 0
    assert "the hub is unreachable" in output, output
    assert f"HF_ENDPOINT=http://127.0.0.1:{hub.port}" in output and "--model_path DIR" in output

    # The failures launched nothing and the server keeps serving.
    import json
    import urllib.request

    with urllib.request.urlopen(server.endpoint + "/v1/models", timeout=10) as r:
        assert json.load(r)["data"] == []


def test_the_wrapper_leaves_other_models_alone():
    """Only our families get the explanation; another model's download error passes unchanged."""
    from xinference.model.llm.cache_manager import LLMCacheManager

    from xinf_llama_vision.compat import xinference_download
    from xinf_llama_vision.registration import explain_download, register

    register()
    assert getattr(LLMCacheManager.cache, "_xlv", False)

    class Manager:  # the attributes the wrapper reads from an LLMCacheManager
        _model_uri = None
        _use_draft_model = False
        _model_id = "Qwen/Qwen2.5-7B-Instruct"
        _model_hub = "huggingface"

        def __init__(self, name):
            self._model_name = name
            self._llm_family = type("Family", (), {"model_name": name, "model_family": None})()

    def offline(self):
        raise hf.LocalEntryNotFoundError("offline")

    xinference_download.uninstall()
    real = LLMCacheManager.cache
    try:
        LLMCacheManager.cache = offline
        xinference_download.install(explain_download)
        with pytest.raises(hf.LocalEntryNotFoundError):
            LLMCacheManager.cache(Manager("qwen2.5-instruct"))
        with pytest.raises(WeightsUnavailable, match="unreachable"):
            LLMCacheManager.cache(Manager("llama-3.2-vision"))
    finally:
        xinference_download.uninstall()
        LLMCacheManager.cache = real
        xinference_download.install(explain_download)
