"""The parity tests every engine must pass, against raw transformers on the same checkpoint.

An engine's test module defines the ``chat_uid`` and ``base_uid`` fixtures (a launched instruct
and base model) and imports these tests (``from parity import *``); pytest collects them there.
Every expected answer comes from :mod:`oracle` (the official template + raw ``generate`` on the
same checkpoint, greedy), never from the code under test.
"""

from __future__ import annotations

import pytest

from oracle import data_uri, png

__all__ = [
    "RED", "BLUE", "MAX", "image_message", "ask", "check_chat", "CONVERSATIONS",
    "test_chat_matches_raw_transformers", "test_images_change_the_answer", "test_streaming_equals_non_streaming",
    "test_max_tokens_and_finish_reason", "test_sampling_that_keeps_one_token_is_greedy",
    "test_stop_token_ids_end_the_answer", "test_stop_string_cuts_the_answer", "test_chat_beyond_the_context_is_a_400",
    # base-model tests last: the vLLM module runs one engine at a time, chat first
    "test_base_completion_matches_raw_transformers", "test_base_completion_with_image",
    "test_completion_beyond_the_context_is_a_400",
]
#: The tiny checkpoint's ``max_position_embeddings``, the context both engines serve it with.
CONTEXT = 4096

RED, BLUE = png((200, 30, 30)), png((10, 20, 220), size=(30, 90))
MAX = 12


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


def check_chat(server, uid, reference, messages, images, date=None):
    """The served answer and usage of a greedy chat equal raw transformers' (rendered on ``date``, the
    server told the same; default today, on both sides)."""
    expected, prompt_tokens, n = reference.generate(reference.render(messages, date), images, MAX)
    on_date = {"extra_body": {"chat_template_kwargs": {"date_string": date}}} if date else {}
    reply = ask(server, uid, messages, **on_date)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == prompt_tokens  # the template's ids: no second <|begin_of_text|>
    assert reply.usage.completion_tokens == n
    assert reply.usage.total_tokens == prompt_tokens + n


@pytest.mark.parametrize("shape", CONVERSATIONS)
def test_chat_matches_raw_transformers(server, chat_uid, reference, shape):
    check_chat(server, chat_uid, reference, *CONVERSATIONS[shape])


def test_images_change_the_answer(server, chat_uid):
    red = ask(server, chat_uid, image_message(RED)).choices[0].message.content
    blue = ask(server, chat_uid, image_message(BLUE)).choices[0].message.content
    assert red != blue


@pytest.mark.parametrize("shape", CONVERSATIONS)
def test_streaming_equals_non_streaming(server, chat_uid, shape):
    messages = CONVERSATIONS[shape][0]
    whole = ask(server, chat_uid, messages)
    chunks = list(ask(server, chat_uid, messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_finish_reason(server, chat_uid, reference):
    messages = CONVERSATIONS["text only"][0]
    reply = ask(server, chat_uid, messages, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("sampling", [{"top_k": 1}, {"top_p": 1e-9}], ids=["top_k=1", "tiny top_p"])
def test_sampling_that_keeps_one_token_is_greedy(server, chat_uid, reference, sampling):
    """At temperature 2 sampling wanders off the greedy answer, unless top_k=1 (or a top_p that keeps
    one token) leaves only the most likely token."""
    messages = image_message(RED)
    expected, _, _ = reference.generate(reference.render(messages), [RED], MAX)
    free = [ask(server, chat_uid, messages, temperature=2.0).choices[0].message.content for _ in range(2)]
    assert any(answer != expected for answer in free), "sampling at temperature 2 should differ from greedy"
    reply = ask(server, chat_uid, messages, temperature=2.0, extra_body=sampling)
    assert reply.choices[0].message.content == expected


def test_stop_token_ids_end_the_answer(server, chat_uid, reference):
    messages = CONVERSATIONS["text only"][0]
    ids = reference.generate_ids(reference.render(messages), [], MAX)
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    reply = ask(server, chat_uid, messages, extra_body={"stop_token_ids": [ids[cut]]})
    assert reply.choices[0].message.content == reference.decode(ids[:cut])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == cut + 1  # the stop token is generated, not shown


def test_stop_string_cuts_the_answer(server, chat_uid, reference):
    messages = CONVERSATIONS["text only"][0]
    full, _, _ = reference.generate(reference.render(messages), [], MAX)
    stop = full[len(full) // 2 :][:3]
    assert stop.strip(), "the reference answer is too short to pick a stop string from"
    reply = ask(server, chat_uid, messages, stop=[stop])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_chat_beyond_the_context_is_a_400(server, chat_uid, reference, stream):
    """Only the engine knows the prompt's length (its words come through); a max_tokens no prompt
    fits is refused up front."""
    hi = [{"role": "user", "content": "hi"}]
    prompt_tokens = len(reference.tokenizer(reference.render(hi), add_special_tokens=False)["input_ids"])
    status, answer = server.post("/v1/chat/completions", {"model": chat_uid, "stream": stream,
                                                           "max_tokens": CONTEXT - 6, "messages": hi})
    assert status == 400, answer
    assert answer["error"]["message"] == (
        f"the prompt is {prompt_tokens} tokens and max_tokens is {CONTEXT - 6}: together more than this model's "
        f"context length of {CONTEXT} tokens; lower max_tokens to at most {CONTEXT - prompt_tokens} or shorten the "
        "prompt")
    status, answer = server.post("/v1/chat/completions", {"model": chat_uid, "stream": stream,
                                                           "max_tokens": CONTEXT, "messages": hi})
    assert status == 400, answer
    assert answer["error"]["message"] == (f"max_tokens: {CONTEXT} is more than this model's context length of "
                                          f"{CONTEXT} tokens leaves after the prompt; ask for at most {CONTEXT - 1}")


def test_base_completion_matches_raw_transformers(server, base_uid, reference):
    client = server.openai()
    prompt = "If I had to write a haiku, it would be:"
    expected, prompt_tokens, n = reference.generate("<|begin_of_text|>" + prompt, [], MAX)
    reply = client.completions.create(model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == n
    chunks = list(client.completions.create(model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_base_completion_with_image(server, base_uid, reference):
    client = server.openai()
    prompt = "<|image|>If I had to write a haiku for this one"
    # Meta's base format: the image, then <|begin_of_text|>; no engine may put another BOS first.
    expected, prompt_tokens, _ = reference.generate("<|image|><|begin_of_text|>" + prompt[len("<|image|>"):], [RED], MAX)
    reply = client.completions.create(
        model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, extra_body={"images": [data_uri(RED)]}
    )
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == prompt_tokens
    chunks = list(client.completions.create(
        model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"images": [data_uri(RED)]},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [reply.choices[0].finish_reason]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (prompt_tokens, reply.usage.completion_tokens)
    other = client.completions.create(
        model=base_uid, prompt=prompt, max_tokens=MAX, temperature=0, extra_body={"images": [data_uri(BLUE)]}
    )
    assert other.choices[0].text != expected


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_completion_beyond_the_context_is_a_400(server, base_uid, reference, stream):
    """The engine's own words come through: the prompt's tokens, max_tokens, and what would fit."""
    prompt_tokens = len(reference.tokenizer("Once upon a time")["input_ids"])  # BOS included
    room = CONTEXT - prompt_tokens
    status, answer = server.post("/v1/completions", {"model": base_uid, "prompt": "Once upon a time",
                                                      "max_tokens": room + 1, "stream": stream})
    assert status == 400, answer
    assert answer["error"]["message"] == (
        f"the prompt is {prompt_tokens} tokens and max_tokens is {room + 1}: together more than this model's "
        f"context length of {CONTEXT} tokens; lower max_tokens to at most {room} or shorten the prompt")
