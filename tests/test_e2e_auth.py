"""Xinference's default authentication on, as real users run it: the plugin is exactly as strict as
Xinference, and works for authorized users.

Two real ``xinference-local`` servers with auth on (setup token → admin → access tokens and
``xf-`` keys), one with the plugin and one without. Every request Xinference refuses (no
credential, a wrong token, a wrong ``xf-`` key, a key scoped to another model, a user who may read
but not launch) gets the same status from both, whatever the body (valid, a bad image, oversized,
an image URL on a host the model may fetch from, a launch), and an image server records that
nothing was fetched. A pair with ``XINFERENCE_ALLOWED_IPS`` excluding the client does the same for
the IP allow-list. Then the whole user path with a key: launch through the CLI, image chat and
streaming with ``openai``, ``xinference-client``, ``doctor``, a round of concurrent requests.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import base_env, start_local
from oracle import data_uri, png
from test_e2e_hostile import images_server  # noqa: F401 - the image server, which records every request

RED = png((220, 30, 30))
PASSWORD = "correct-horse-battery"
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


def start(tmp_path_factory, name, plugin=True, auth=True, **env):
    home = tmp_path_factory.mktemp(name)
    environment = base_env(home)
    if not plugin:
        environment.pop("XINFERENCE_EXTENSIONS")
    if auth:
        environment.pop("XINFERENCE_AUTH_ADVANCED")  # Xinference's default: on
    environment.update(env)
    server = start_local(home, environment)
    deadline = time.time() + 180
    while True:  # up when it answers at all (a client outside XINFERENCE_ALLOWED_IPS gets a 403)
        try:
            httpx.get(server.endpoint + "/v1/admin/setup/status", timeout=5)
            return server
        except httpx.HTTPError:
            if server.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{server.log.read_text()[-3000:]}") from None
            time.sleep(1)


class Accounts:
    """The admin (from the setup token in the log), a read-only user, and keys, on one server."""

    def __init__(self, server):
        self.server = server
        token = re.search(r"Setup token: (\S+)", server.log.read_text()).group(1)
        self.post("/v1/admin/setup", {"setup_token": token, "username": "admin", "password": PASSWORD}, None, 201)
        self.admin = self.login("admin")
        self.post("/v1/admin/users", {"username": "reader", "password": PASSWORD,
                                      "permissions": ["models:list", "models:read"]}, self.admin, (200, 201))
        self.reader = self.login("reader")
        self.key = self.new_key("all models")
        self.other_key = self.new_key("another model", [{"permission_type": "model_id", "permission_value": "elsewhere"}])

    def post(self, path, body, token, expect):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.post(self.server.endpoint + path, json=body, headers=headers, timeout=60)
        assert response.status_code in (expect if isinstance(expect, tuple) else (expect,)), response.text
        return response.json()

    def login(self, user):
        return self.post("/token", {"username": user, "password": PASSWORD}, None, 200)["access_token"]

    def new_key(self, name, permissions=None):
        body = {"name": name, **({"model_permissions": permissions} if permissions else {})}
        created = self.post("/v1/admin/keys", body, self.admin, 201)
        key = created.get("key") or created.get("api_key")
        assert isinstance(key, str) and key.startswith("xf-"), created
        return key


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_checkpoint, images_server):
    """``(with the plugin, its accounts, without, its accounts)``; on the first, our model ``guarded``
    may fetch images from 127.0.0.1 (the image server)."""
    # The matrix below sends dozens of bad tokens: Xinference's IP ban (10 by default) is raised here
    # and tested on its own server (test_bad_tokens_count_once_toward_the_ip_ban).
    ban = {"XINFERENCE_RATE_LIMIT_IP_MAX_FAILURES": "100000"}
    ours = start(tmp_path_factory, "auth-plugin", **ban)
    bare = start(tmp_path_factory, "auth-bare", plugin=False, **ban)
    try:
        ours_accounts, bare_accounts = Accounts(ours), Accounts(bare)
        ours.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "transformers",
                 "--model_path", tiny_checkpoint, "--model-uid", "guarded", "--disable-virtual-env",
                 "--image_allow_hosts", "127.0.0.1", "--api-key", ours_accounts.admin)
        yield ours, ours_accounts, bare, bare_accounts
    finally:
        ours.stop()
        bare.stop()


def bodies(images_server):
    """name → (path, body): what each refused client sends."""
    image = lambda url: {"model": "guarded", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}
    return {
        "valid": ("/v1/chat/completions", {"model": "guarded", "messages": MESSAGES, "max_tokens": 4}),
        "bad image": ("/v1/chat/completions", image("data:image/png;base64,AAAA")),
        "oversized": ("/v1/chat/completions", image("data:image/png;base64," + "A" * (66 * 2**20))),
        "allowed host": ("/v1/chat/completions", image(images_server.url("/red.png"))),
        "completion with an image": ("/v1/completions", {"model": "guarded", "prompt": "<|image|>Hi",
                                                          "images": [images_server.url("/red.png")], "max_tokens": 4}),
        "launch": ("/v1/models", {"model_name": "llama-3.2-vision-instruct", "model_engine": "vllm",
                                  "model_uid": "x", "model_path": "/nowhere"}),
    }


def credentials(accounts, key_kind):
    return {
        "no credential": None,
        "wrong token": "not-a-token",
        "wrong xf- key": "xf-" + "0" * 40,
        "key scoped to another model": accounts.other_key,
        "read-only user": accounts.reader,
    }[key_kind]


REFUSED = ["no credential", "wrong token", "wrong xf- key", "key scoped to another model", "read-only user"]


def send(server, path, body, credential):
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    response = httpx.post(server.endpoint + path, json=body, headers=headers, timeout=120)
    return response.status_code, response.headers


@pytest.mark.parametrize("who", REFUSED)
def test_what_xinference_refuses_gets_the_same_answer_with_the_plugin(pair, images_server, who):
    ours, ours_accounts, bare, bare_accounts = pair
    for name, (path, body) in bodies(images_server).items():
        if who == "read-only user" and path != "/v1/models":
            continue  # may read: not refused by Xinference, see the authorized tests
        got, headers = send(ours, path, body, credentials(ours_accounts, who))
        want, _ = send(bare, path, body, credentials(bare_accounts, who))
        assert got == want and got in (401, 403), (who, name, got, want)
        assert "x-request-id" in {k.lower() for k in headers} or got == 401, (who, name, headers)
    assert images_server.requests == [], "a refused client made the server fetch an image"


def test_bad_tokens_count_once_toward_the_ip_ban(tmp_path_factory, pair):
    """Xinference bans an IP after 10 bad tokens (its default): through the plugin's routes, still after
    the 10th, not the 5th (the plugin authenticates nothing itself)."""
    server = start(tmp_path_factory, "auth-ban")
    try:
        admin = Accounts(server).admin
        body = {"model": "guarded", "messages": MESSAGES}
        statuses = [send(server, "/v1/chat/completions", body, f"bad-{i}")[0] for i in range(9)]
        assert set(statuses) == {401}, statuses
        listed = httpx.get(server.endpoint + "/v1/models", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        assert listed.status_code == 200, listed.text  # 9 bad tokens: not banned
        assert send(server, "/v1/chat/completions", body, "bad-10")[0] in (401, 429)
        assert send(server, "/v1/chat/completions", body, "bad-11")[0] == 429  # banned after the 10th
    finally:
        server.stop()


def test_the_allow_list_of_ips_comes_first(tmp_path_factory, images_server):
    """A client outside ``XINFERENCE_ALLOWED_IPS``: Xinference's 403, the same with and without the plugin."""
    ours = start(tmp_path_factory, "ips-plugin", auth=False, XINFERENCE_ALLOWED_IPS="10.9.9.9")
    bare = start(tmp_path_factory, "ips-bare", plugin=False, auth=False, XINFERENCE_ALLOWED_IPS="10.9.9.9")
    try:
        for name, (path, body) in bodies(images_server).items():
            got, want = send(ours, path, body, None)[0], send(bare, path, body, None)[0]
            assert got == want == 403, (name, got, want)
        assert images_server.requests == []
    finally:
        ours.stop()
        bare.stop()


def test_the_status_route_needs_the_credential_of_cluster_version(pair):
    ours, accounts, _, _ = pair
    url = ours.endpoint + "/v1/xinf-llama-vision/status"
    for credential in (None, "not-a-token", accounts.key, accounts.reader):
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        version = httpx.get(ours.endpoint + "/v1/cluster/version", headers=headers, timeout=30).status_code
        assert httpx.get(url, headers=headers, timeout=30).status_code == version != 200, credential
    response = httpx.get(url, headers={"Authorization": f"Bearer {accounts.admin}"}, timeout=30)
    assert response.status_code == 200 and "llama-3.2-vision-instruct" in response.json()["families"]


def doctor(server, *extra):
    return subprocess.run([sys.executable, "-m", "xinf_llama_vision", "doctor", "--endpoint", server.endpoint, *extra],
                          capture_output=True, text=True, timeout=120, env=server.env)


def test_doctor_says_when_a_credential_is_missing_or_wrong(pair):
    ours, accounts, _, _ = pair
    missing = doctor(ours)
    assert missing.returncode == 1 and "requires a credential (authentication is on); pass --api-key" in missing.stdout
    wrong = doctor(ours, "--api-key", "not-a-token")
    assert wrong.returncode == 1 and "refused the credential given (--api-key, HTTP 401)" in wrong.stdout
    good = doctor(ours, "--api-key", accounts.admin)
    assert "plugin" in good.stdout and "active, serving llama-3.2-vision-instruct" in good.stdout, good.stdout


# -- the authorized user's path ----------------------------------------------------------------


def test_an_authorized_key_gets_image_chat_streaming_and_our_400s(pair, images_server, reference):
    from openai import OpenAI

    ours, accounts, _, _ = pair
    client = OpenAI(base_url=ours.endpoint + "/v1", api_key=accounts.key, max_retries=0, timeout=300)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(RED)}},
                                          {"type": "text", "text": "What is this?"}]}]
    expected = reference.generate(reference.render(image), [RED], 8)[0]
    answer = client.chat.completions.create(model="guarded", messages=image, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected
    streamed = client.chat.completions.create(model="guarded", messages=image, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    # An allow-listed host is fetched for an authorized key (the image server records it).
    fetched = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images_server.url("/red.png")}},
                                            {"type": "text", "text": "What is this?"}]}]
    assert client.chat.completions.create(model="guarded", messages=fetched, max_tokens=2).choices
    assert images_server.requests
    # An authorized client's mistake: our clear 400, with Xinference's request id.
    response = httpx.post(ours.endpoint + "/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {accounts.key}", "Origin": "http://ui.example"},
                          json={"model": "guarded", "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": "http://10.1.2.3/a.png"}}]}]})
    assert response.status_code == 400 and "private address 10.1.2.3" in response.json()["error"]["message"]
    assert response.headers.get("x-request-id") and response.headers.get("access-control-allow-origin")


def test_xinference_client_with_a_key(pair):
    from xinference_client import RESTfulClient

    ours, accounts, _, _ = pair
    client = RESTfulClient(ours.endpoint, api_key=accounts.key)
    model = client.get_model("guarded")
    answer = model.chat(messages=MESSAGES, generate_config={"max_tokens": 4, "temperature": 0})
    assert answer["choices"][0]["message"]["content"]


def test_concurrent_requests_with_a_key(pair, reference):
    ours, accounts, _, _ = pair
    expected = reference.generate(reference.render(MESSAGES), [], 6)[0]

    def ask(i):
        body = {"model": "guarded", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": i % 2 == 0}
        response = httpx.post(ours.endpoint + "/v1/chat/completions", json=body, timeout=300,
                              headers={"Authorization": f"Bearer {accounts.key}"})
        assert response.status_code == 200, response.text
        if not body["stream"]:
            return response.json()["choices"][0]["message"]["content"]
        import json

        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, range(16))) == [expected] * 16


def image_cache_counts(server):
    """``(hits, misses)`` of the model's last image cache report, and how many reports there were."""
    found = re.findall(r"image cache: (\d+) hits, (\d+) misses", server.log.read_text(errors="replace"))
    return (tuple(map(int, found[-1])) if found else (0, 0)), len(found)


def ask_and_count(server, key, source, reference):
    """One question about the picture at ``source`` with ``key``, its answer checked; then the image
    cache's counts once the model reports them (when it is idle)."""
    from openai import OpenAI

    from test_e2e_hostile import RED as SERVED  # the picture the image server serves as /red.png

    _, reports = image_cache_counts(server)
    client = OpenAI(base_url=server.endpoint + "/v1", api_key=key, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": source}},
                                             {"type": "text", "text": "What is this?"}]}]
    answer = client.chat.completions.create(model="guarded", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == reference.generate(reference.render(messages), [SERVED], 8)[0]
    deadline = time.time() + 30
    while image_cache_counts(server)[1] == reports and time.time() < deadline:
        time.sleep(0.3)
    return image_cache_counts(server)[0]


def test_the_image_cache_is_scoped_per_key(pair, images_server, reference):
    """Under Xinference's default authentication: a key that sends a picture again (as a URL, then as
    a data URI of the same PNG) hits the image cache; another key sending the same picture does not,
    so its answer's speed tells it nothing about what the first key sent (docs/performance.md)."""
    import base64

    from test_e2e_hostile import RED_PNG

    ours, accounts, _, _ = pair
    second = accounts.new_key("second key, all models")
    inline = "data:image/png;base64," + base64.b64encode(RED_PNG).decode()
    hits, misses = ask_and_count(ours, accounts.key, images_server.url("/red.png"), reference)
    assert ask_and_count(ours, accounts.key, inline, reference) == (hits + 1, misses)  # the same pixels: a hit
    assert ask_and_count(ours, second, inline, reference) == (hits + 1, misses + 1)  # another key: a miss
    assert ask_and_count(ours, second, images_server.url("/red.png"), reference) == (hits + 2, misses + 1)
