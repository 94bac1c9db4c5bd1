"""Images whose encoder input is longer than ``--max_model_len`` on our V1 model: a 400 in words that
name the setting and the fix (vLLM's own refusal reached clients as "Request exceeds the model's
configured context length", and the plugin's guard then blamed the prompt and ``max_tokens``).

A checkpoint with 112-pixel tiles (65 encoder positions each, 260 for a 4-tile image) launched with
``--max_model_len 256``: one 4-tile image does not fit; one- and two-tile images do.
"""

from __future__ import annotations

import pytest

from oracle import png
from parity import image_message

BIG = png((200, 30, 30), size=(300, 300))  # 4 tiles of 112 pixels: 260 positions
SMALL = png((30, 30, 200), size=(60, 40))  # 1 tile: 65
WIDE = png((30, 200, 30), size=(200, 50))  # 2 tiles: 130


@pytest.fixture(scope="module")
def short(server, vllm_launch, tmp_path_factory):
    from tiny import VISION, build

    path = build(str(tmp_path_factory.mktemp("tiles-112")), vision=dict(VISION, image_size=112))
    uid = vllm_launch("llama-3.2-vision-instruct", "v1-short", "--max_model_len", "256", path=path)
    yield uid
    server.cli("terminate", "--model-uid", uid, check=False)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_an_image_longer_than_max_model_len_is_a_400_naming_it(server, short, stream):
    status, body = server.post("/v1/chat/completions", {"model": short, "messages": image_message(BIG),
                                                        "max_tokens": 4, "temperature": 0, "stream": stream})
    message = body["error"]["message"] if isinstance(body, dict) else body
    assert status == 400, (status, body)
    assert "260 encoder positions (4 tiles of 65)" in message and "max_model_len of 256" in message
    assert "--max_model_len 260 or more" in message


@pytest.mark.parametrize("image", [SMALL, WIDE], ids=["one tile", "two tiles"])
def test_images_that_fit_are_answered(server, short, image):
    status, body = server.post("/v1/chat/completions", {"model": short, "messages": image_message(image),
                                                        "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] is not None, body
