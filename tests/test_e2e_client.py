"""``xinference-client``, the Python client Xinference's own docs teach first, end to end: a real
``xinference-local``, ``RESTfulClient(...).get_model(uid)``, ``.chat`` with an image (a data URI and
an http URL) and ``.generate`` on the base family with ``images``, streaming and not. Every answer
equals raw transformers' on the same checkpoint (greedy).
"""

from __future__ import annotations

import pytest

from oracle import data_uri
from test_e2e_hostile import (  # noqa: F401 - fixtures: models allowed to fetch from the loopback image server
    MAX,
    RED,
    allow_base,
    allow_chat,
    expected_chat,
    expected_completion,
    images_server,
)


@pytest.fixture(scope="module")
def client(server):
    from xinference_client import RESTfulClient

    return RESTfulClient(server.endpoint, api_key=server.api_key)


def sources(images_server):
    return {"data URI": data_uri(RED), "http URL": images_server.url("/red.png")}


def streamed(chunks, piece) -> str:
    """The text of a stream of chunks (dicts), ``piece(choice)`` of each."""
    return "".join(piece(c["choices"][0]) for c in chunks if c.get("choices"))


@pytest.mark.parametrize("kind", ["data URI", "http URL"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_with_an_image(client, allow_chat, images_server, reference, kind, stream):
    model = client.get_model(allow_chat)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": sources(images_server)[kind]}},
                                             {"type": "text", "text": "What is this?"}]}]
    config = {"max_tokens": MAX, "temperature": 0, "stream": stream}
    answer = model.chat(messages=messages, generate_config=config)
    text = streamed(answer, lambda c: c["delta"].get("content") or "") if stream else \
        answer["choices"][0]["message"]["content"]
    assert text == expected_chat(reference, RED)


@pytest.mark.parametrize("kind", ["data URI", "http URL"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_generate_on_the_base_family_with_images(client, allow_base, images_server, reference, kind, stream):
    model = client.get_model(allow_base)
    config = {"max_tokens": MAX, "temperature": 0, "stream": stream, "images": [sources(images_server)[kind]]}
    answer = model.generate("<|image|>Caption:", generate_config=config)
    text = streamed(answer, lambda c: c["text"]) if stream else answer["choices"][0]["text"]
    assert text == expected_completion(reference, RED)


def test_a_refused_image_is_the_clients_error(client, allow_chat):
    """The 400 reaches the client's exception with our message (a private address, not fetched)."""
    model = client.get_model(allow_chat)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.1.2.3/a.png"}},
                                             {"type": "text", "text": "?"}]}]
    with pytest.raises(RuntimeError, match=r"private address 10\.1\.2\.3"):
        model.chat(messages=messages, generate_config={"max_tokens": MAX})
