"""Hypothesis strategies for request bodies: wrong types, nesting, huge strings, odd unicode,
random roles and parts, mixed with well-formed pieces so that the deep paths are reached too.

Image URLs are ``data:`` URIs (valid, truncated or junk), other schemes, paths, and http URLs
to literal private/loopback addresses only (refused before any connection): the fuzzers never
make a name lookup or leave the machine.
"""

from __future__ import annotations

import base64
import io

from hypothesis import strategies as st
from PIL import Image


def _png(size=(8, 8), color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
GOOD_IMAGE = "data:image/png;base64," + base64.b64encode(PNG).decode()

#: Strings that are odd for a reason: control characters, lone surrogates, RTL marks, special tokens.
ODD = [
    "", " ", "\x00", "\n\r\t", "\ud800", "\udfff", "\u202e", "\ufeff", "\U0001f600", "e\u0301", "\uffff",
    "<|image|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "{{ 1 }}", "{% raw %}", "%s%n",
    "null", "NaN", "-1", "data:", "http://", "file:///etc/passwd",
]

# Lone surrogates included (JSON can carry them as \\udXXX escapes).
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=40),
    st.sampled_from(ODD),
    st.builds(lambda s, n: s * n, st.sampled_from(["a", "\U0001f600", "<|image|>", " "]), st.integers(1, 3000)),
)

#: Huge strings only where a server has no reason to tokenize them (they are refused first).
huge = st.builds(lambda s, n: s * n, st.sampled_from(["x", "\u00e9", "<|image|>"]), st.integers(10_000, 200_000))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), texts,
)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4), max_leaves=12)

image_urls = st.one_of(
    st.just(GOOD_IMAGE),
    st.just("data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode()),  # truncated
    st.just("data:image/png;base64,@@not base64@@"),
    st.just("data:text/plain;base64," + base64.b64encode(b"hello, not an image").decode()),
    st.just("data:image/png," + "x" * 10),  # not base64
    st.sampled_from([
        "http://127.0.0.1:1/x.png", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png",
        "http://[::1]/a.png", "http://0.0.0.0/a.png", "https://192.168.0.1:443/a.png", "http://user:pw@10.0.0.2/",
        "file:///etc/passwd", "/etc/passwd", "../../etc/shadow", "ftp://10.0.0.1/a.png", "gopher://127.0.0.1/",
        "http://[fe80::1%25eth0]/", "http://127.0.0.1:99999/", "http://[::ffff:127.0.0.1]/", "data:",
    ]),
    texts.map(lambda t: "data:image/png;base64," + t),
    json_values,
)

text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_values)})
image_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_urls})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_urls}),
    st.fixed_dictionaries({"type": st.just("image"), "url": image_urls}),
    st.fixed_dictionaries({"type": st.just("image"), "image": image_urls}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": json_values}),
    st.just({"type": "image"}),  # its image comes from the request's "images" list
)
odd_parts = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["input_audio", "video_url", "TEXT", "image_url ", None, 3]), texts)},
    optional={"text": json_values, "image_url": json_values, "url": json_values},
)
parts = st.one_of(text_parts, text_parts, image_parts, odd_parts, json_values)
contents = st.one_of(texts, st.lists(parts, max_size=4), json_values)

ROLES = ["system", "user", "assistant", "tool", "ipython"]
roles = st.one_of(st.sampled_from(ROLES), st.sampled_from(ROLES), texts, json_values)
tool_calls = st.one_of(
    st.lists(st.fixed_dictionaries({
        "id": texts, "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.one_of(texts, json_values)},
                                          optional={"arguments": st.one_of(texts, st.just('{"x": 1}'), json_values)}),
    }), max_size=2),
    json_values,
)
messages_one = st.fixed_dictionaries(
    {"role": roles, "content": contents},
    optional={"tool_calls": tool_calls, "name": texts, "tool_call_id": texts},
)

# Mostly well-formed conversations (so the deep paths run), then the same with one message mutated.
_short = st.text(max_size=12)
_good_image_part = st.sampled_from([
    {"type": "image_url", "image_url": {"url": GOOD_IMAGE}}, {"type": "image_url", "image_url": GOOD_IMAGE},
    {"type": "image", "url": GOOD_IMAGE}, {"type": "image"},
])
_good_text_part = st.builds(lambda t: {"type": "text", "text": t}, _short)
_good_call = st.fixed_dictionaries({"id": _short, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "f"]), "arguments": st.sampled_from(['{"city": "Oslo"}', "", "{}"])})})
good_user = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    _short, st.lists(st.one_of(_good_text_part, _good_image_part), min_size=1, max_size=3))})
good_assistant = st.one_of(
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(_short, st.lists(_good_text_part, max_size=2))}),
    st.fixed_dictionaries({"role": st.just("assistant"), "tool_calls": st.lists(_good_call, min_size=1, max_size=2),
                           "content": st.one_of(st.none(), st.just(""), st.lists(st.one_of(parts, _good_image_part), max_size=2))}),
)
good_tool = st.fixed_dictionaries({"role": st.sampled_from(["tool", "ipython"]), "content": st.one_of(
    _short, st.dictionaries(_short, _short, max_size=2), st.lists(_good_text_part, max_size=2))})
good_system = st.fixed_dictionaries({"role": st.just("system"), "content": st.one_of(_short, st.lists(_good_text_part, max_size=2))})
conversations = st.builds(
    lambda system, turns, last: system + turns + [last],
    st.lists(good_system, max_size=1), st.lists(st.one_of(good_user, good_assistant, good_tool), max_size=3),
    st.one_of(good_user, good_tool),
)


def _mutate(messages: list, at: int, replacement) -> list:
    messages = list(messages)
    messages[at % len(messages)] = replacement
    return messages


mutated = st.builds(_mutate, conversations, st.integers(0, 10), st.one_of(messages_one, json_values))
message_lists = st.one_of(
    conversations, conversations, mutated, mutated,
    st.lists(messages_one, max_size=5), st.lists(st.one_of(messages_one, json_values), max_size=4), json_values,
)

tools = st.one_of(
    st.none(), st.just([]),
    st.just([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
    json_values,
)
chat_template_kwargs = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={"date_string": st.one_of(texts, json_values),
                                        "tools_in_user_message": st.one_of(st.booleans(), json_values),
                                        "xinf_llama_vision_images": json_values}),
    json_values,
)


completion_images = st.one_of(st.none(), st.lists(image_urls, max_size=3), json_values)


def sampling(max_tokens=st.one_of(st.integers(1, 4), json_values)):
    return st.fixed_dictionaries({"max_tokens": max_tokens}, optional={
        "temperature": st.one_of(st.just(0), json_values), "top_p": json_values, "top_k": json_values,
        "stop": st.one_of(texts, st.lists(texts, max_size=3), json_values),
        "stop_token_ids": json_values, "stream": st.one_of(st.booleans(), json_values),
        "stream_options": json_values, "tools": tools, "chat_template_kwargs": chat_template_kwargs,
    })


def chat_bodies(max_tokens=st.one_of(st.integers(1, 4), json_values)):
    """Junk sampling fields half of the time, valid ones the other half (so the messages matter)."""
    valid = st.fixed_dictionaries({"max_tokens": st.integers(1, 4), "temperature": st.just(0)},
                                  optional={"stream": st.booleans(), "tools": tools,
                                            "images": st.one_of(st.just([GOOD_IMAGE]), completion_images)})
    return st.builds(lambda m, s: {**s, "messages": m}, message_lists, st.one_of(sampling(max_tokens), valid))


completion_prompts = st.one_of(
    texts, st.sampled_from(["<|image|>Caption:", "<|image|><|image|>", "<|begin_of_text|>Once", "Once upon"]), json_values,
)


def completion_bodies(max_tokens=st.one_of(st.integers(1, 4), json_values)):
    valid = st.fixed_dictionaries({"max_tokens": st.integers(1, 4), "temperature": st.just(0)},
                                  optional={"stream": st.booleans()})
    return st.builds(lambda p, i, s: {**s, "prompt": p, "images": i}, completion_prompts, completion_images,
                     st.one_of(sampling(max_tokens), valid))


def _put_huge(body: dict, where: str, value: str) -> dict:
    """``body`` with a huge string at a place that is refused before any tokenizing."""
    body = dict(body)
    if where == "role":
        body["messages"] = [{"role": value, "content": "hi"}]
    elif where == "part type":
        body["messages"] = [{"role": "user", "content": [{"type": value}]}]
    elif where == "image url":
        body["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + value}}]}]
    elif where == "stop":
        body["stop"] = [value, 3]
    elif where == "date_string":
        body["chat_template_kwargs"] = {"date_string": 5, "junk": value}
    else:  # an unknown top-level field with a huge value next to an invalid one
        body[value[:100]] = value
        body["top_p"] = 5
    return body


def huge_chat_bodies(max_tokens=st.integers(1, 4)):
    """Huge strings (10k-200k chars) in places that a server refuses before tokenizing."""
    return st.builds(_put_huge, sampling(max_tokens), st.sampled_from(["role", "part type", "image url", "stop",
                                                                       "date_string", "field"]), huge)
