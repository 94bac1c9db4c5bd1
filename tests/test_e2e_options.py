"""OpenAI request options on the Transformers engine, over HTTP against a real ``xinference-local``:
each is honoured exactly as raw transformers ``generate`` does it for that request alone (same
checkpoint, same processors, same seed), or refused with a 400 that names it.

The references (:class:`oracle.Raw`) are built independently of the plugin: xgrammar's own
transformers logits processor for ``response_format``, OpenAI's penalty formula written out
(:class:`oracle.OpenAIFormula`), ``torch.manual_seed`` for ``seed``, and ``log_softmax`` of
``generate``'s raw logits for ``logprobs``.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from oracle import OpenAIFormula, Raw, data_uri, png
from sampled_logprobs import check_constrained_logprobs, check_partial_character_bytes, check_sampled_logprobs
from xinf_llama_vision.request.options import CHAT, COMPLETIONS, EXTENSIONS, OPTIONS

RED = png((220, 30, 30))
IMAGE_CHAT = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(RED)}},
                                           {"type": "text", "text": "Describe the shape as JSON."}]}]
TEXT_CHAT = [{"role": "user", "content": "Name three rivers."}]
SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                           "round": {"type": "boolean"}},
          "required": ["color", "round"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def raw(reference):
    return Raw(reference)


def chat(server, uid, messages=TEXT_CHAT, **options):
    status, body = server.post("/v1/chat/completions", {"model": uid, "messages": messages, **options})
    assert status == 200, body
    return body


def stream(server, uid, path, body):
    """The chunks of a streamed answer, parsed."""
    status, text = server.post(path, {"model": uid, **body, "stream": True})
    assert status == 200, text
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def prompt_tokens(raw, messages, images):
    return int(raw.ref.inputs(raw.render(messages), images)["input_ids"].shape[1])


# -- response_format --------------------------------------------------------------------------


def valid(answer: dict) -> bool:
    return (set(answer) == {"color", "round"} and answer["color"] in ("red", "green", "blue")
            and isinstance(answer["round"], bool))


def test_json_schema_answer_validates_and_equals_raw_with_xgrammar(server, chat_uid, raw):
    free = chat(server, chat_uid, IMAGE_CHAT, max_tokens=40, temperature=0)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)  # this checkpoint does not answer in JSON by itself
    body = chat(server, chat_uid, IMAGE_CHAT, max_tokens=40, temperature=0, response_format=JSON_SCHEMA)
    answer = body["choices"][0]["message"]["content"]
    assert valid(json.loads(answer)), answer
    assert body["choices"][0]["finish_reason"] == "stop"
    ids, _ = raw.chat(IMAGE_CHAT, [RED], 40, do_sample=False, processors=[raw.grammar(JSON_SCHEMA)])
    assert answer == raw.text(ids)
    assert body["usage"]["completion_tokens"] == len(ids)


def test_json_object_equals_raw_with_xgrammar_json(server, chat_uid, raw):
    fmt = {"type": "json_object"}
    answer = chat(server, chat_uid, TEXT_CHAT, max_tokens=24, temperature=0, response_format=fmt)
    ids, _ = raw.chat(TEXT_CHAT, [], 24, do_sample=False, processors=[raw.grammar(fmt)])
    assert answer["choices"][0]["message"]["content"] == raw.text(ids)
    assert raw.text(ids).lstrip().startswith(("{", "["))


def test_json_schema_on_a_base_completion(server, base_uid, raw):
    prompt = "<|image|><|begin_of_text|>The shape as JSON:"
    status, body = server.post("/v1/completions", {"model": base_uid, "prompt": prompt, "images": [data_uri(RED)],
                                                   "max_tokens": 40, "temperature": 0, "response_format": JSON_SCHEMA})
    assert status == 200, body
    assert valid(json.loads(body["choices"][0]["text"]))
    ids, _ = raw.run(prompt, [RED], 40, do_sample=False, processors=[raw.grammar(JSON_SCHEMA)])
    assert body["choices"][0]["text"] == raw.text(ids)


def test_a_schema_xgrammar_cannot_use_is_a_400(server, chat_uid):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "colour"}}}}}
    status, body = server.post("/v1/chat/completions", {"model": chat_uid, "messages": TEXT_CHAT, "response_format": bad})
    assert status == 400 and body["error"]["message"].startswith(
        "response_format.json_schema.schema: cannot be used for constrained decoding: "), body
    assert ".cc:" not in body["error"]["message"]


# -- logprobs ---------------------------------------------------------------------------------


def test_chat_logprobs_equal_log_softmax_of_raw_logits(server, chat_uid, raw):
    body = chat(server, chat_uid, IMAGE_CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    ids, logits = raw.chat(IMAGE_CHAT, [RED], 8, do_sample=False)
    assert len(content) == len(ids) == body["usage"]["completion_tokens"]
    for entry, token, row in zip(content, ids, logits):
        expected = torch.log_softmax(row.float(), dim=-1)
        assert int(expected.argmax()) == token  # greedy: the chosen token is the argmax
        assert entry["token"] == raw.ref.tokenizer.decode([token])
        assert math.isclose(entry["logprob"], float(expected[token]), abs_tol=1e-4)
        values, top_ids = torch.topk(expected, 3)
        assert [t["token"] for t in entry["top_logprobs"]] == [raw.ref.tokenizer.decode([i]) for i in top_ids.tolist()]
        for got, want in zip(entry["top_logprobs"], values.tolist()):
            assert math.isclose(got["logprob"], want, abs_tol=1e-4)
    # Each token's own bytes (tests/test_token_bytes.py: also parts of a character): joined, the answer.
    joined = b"".join(bytes(entry["bytes"]) for entry in content)
    assert joined.decode("utf-8", errors="replace") == body["choices"][0]["message"]["content"]
    # Streaming gives the same entries, spread over the chunks.
    chunks = stream(server, chat_uid, "/v1/chat/completions",
                    {"messages": IMAGE_CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3})
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert streamed == content


def test_completion_logprobs_in_the_legacy_shape(server, base_uid, raw):
    prompt = "<|begin_of_text|>Once upon a time"
    status, body = server.post("/v1/completions", {"model": base_uid, "prompt": prompt, "max_tokens": 6,
                                                   "temperature": 0, "logprobs": 2})
    assert status == 200, body
    logprobs = body["choices"][0]["logprobs"]
    ids, logits = raw.run(prompt, [], 6, do_sample=False)
    assert logprobs["tokens"] == [raw.ref.tokenizer.decode([i]) for i in ids]
    for value, top, token, row in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], ids, logits):
        expected = torch.log_softmax(row.float(), dim=-1)
        assert math.isclose(value, float(expected[token]), abs_tol=1e-4)
        assert len(top) <= 2 and math.isclose(max(top.values()), float(expected.max()), abs_tol=1e-4)
    assert logprobs["text_offset"][0] == 0


def test_sampled_logprobs_are_the_models_own(server, chat_uid, raw):
    check_sampled_logprobs(server.post, chat_uid, raw, IMAGE_CHAT, [RED], tol=1e-4)


def test_logprobs_with_a_format_are_over_what_it_allows(server, chat_uid, raw):
    check_constrained_logprobs(server.post, chat_uid, raw, IMAGE_CHAT, [RED], JSON_SCHEMA, tol=1e-4)


def test_logprob_bytes_are_each_tokens_own_in_a_served_answer(server, chat_uid, raw):
    check_partial_character_bytes(server.post, chat_uid, raw.ref.tokenizer)


def test_no_logprobs_unless_asked(server, chat_uid):
    assert chat(server, chat_uid, max_tokens=4, temperature=0)["choices"][0]["logprobs"] is None


# -- n and seed -------------------------------------------------------------------------------


def test_n_three_choices_each_as_raw_with_its_seed(server, chat_uid, raw):
    body = chat(server, chat_uid, IMAGE_CHAT, max_tokens=10, temperature=1.0, seed=5, n=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # top_k=0: a request without top_k samples from every token (the checkpoint sets none; docs/api.md).
    expected = [raw.chat(IMAGE_CHAT, [RED], 10, seed=5 + i, do_sample=True, temperature=1.0, top_k=0)[0]
                for i in range(3)]
    assert [c["message"]["content"] for c in body["choices"]] == [raw.text(ids) for ids in expected]
    assert len({c["message"]["content"] for c in body["choices"]}) == 3
    assert body["usage"]["completion_tokens"] == sum(len(ids) for ids in expected)
    assert body["usage"]["prompt_tokens"] == prompt_tokens(raw, IMAGE_CHAT, [RED])
    # Streamed, each chunk says its choice; put together they are the same three answers.
    chunks = stream(server, chat_uid, "/v1/chat/completions",
                    {"messages": IMAGE_CHAT, "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 3,
                     "stream_options": {"include_usage": True}})
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == [c["message"]["content"] for c in body["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]


def test_n_on_a_completion(server, base_uid):
    status, body = server.post("/v1/completions", {"model": base_uid, "prompt": "<|begin_of_text|>Hi", "n": 2,
                                                   "max_tokens": 4, "temperature": 0})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1], body
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: the same answer twice


def test_seed_gives_the_same_answer_as_raw_with_that_seed(server, chat_uid, raw):
    first = chat(server, chat_uid, max_tokens=12, temperature=1.0, seed=7)["choices"][0]["message"]["content"]
    again = chat(server, chat_uid, max_tokens=12, temperature=1.0, seed=7)["choices"][0]["message"]["content"]
    other = chat(server, chat_uid, max_tokens=12, temperature=1.0, seed=8)["choices"][0]["message"]["content"]
    ids, _ = raw.chat(TEXT_CHAT, [], 12, seed=7, do_sample=True, temperature=1.0, top_k=0)
    assert first == again == raw.text(ids)
    assert other != first


def test_top_k_zero_is_no_top_k_as_unset_is(server, chat_uid, raw):
    """Every engine reads an unset top_k and 0 alike: no top-k (transformers' own default would be 50).
    (-1, vLLM's old word for it, Xinference's REST schema refuses before the plugin sees it.)"""
    answer = chat(server, chat_uid, max_tokens=12, temperature=1.5, seed=9, top_k=0)["choices"][0]["message"]
    unset = chat(server, chat_uid, max_tokens=12, temperature=1.5, seed=9)["choices"][0]["message"]
    everything, _ = raw.chat(TEXT_CHAT, [], 12, seed=9, do_sample=True, temperature=1.5, top_k=0)
    fifty, _ = raw.chat(TEXT_CHAT, [], 12, seed=9, do_sample=True, temperature=1.5, top_k=50)
    assert raw.text(everything) != raw.text(fifty)  # the seed tells the two readings apart
    assert answer["content"] == unset["content"] == raw.text(everything)


# -- penalties --------------------------------------------------------------------------------


#: The date the flat checkpoint's chats are rendered with, on both sides (a text-only prompt holds
#: the date, and whether a penalty changes a 24-token answer depends on the prompt).
FLAT_DATE = "01 Jan 2025"
ON_FLAT_DATE = {"chat_template_kwargs": {"date_string": FLAT_DATE}}


@pytest.fixture(scope="module")
def flat(server, tmp_path_factory):
    """``(uid, Raw)`` of a checkpoint with flatter logits (top tokens 1-3 apart, not ~20): there,
    penalties of OpenAI's size change greedy answers."""
    from oracle import Reference
    from tiny import build

    path = build(str(tmp_path_factory.mktemp("flat-mllama")), head_scale=6.0)
    uid = server.launch("llama-3.2-vision-instruct", "flat-logits", path, "--disable-virtual-env")
    return uid, Raw(Reference(path), FLAT_DATE)


@pytest.mark.parametrize("presence, frequency", [(-2.0, 0.0), (0.0, -1.0), (-2.0, 0.5)])
def test_openai_penalties_equal_raw_with_openai_formula(server, flat, presence, frequency):
    uid, raw = flat
    body = chat(server, uid, max_tokens=24, temperature=0, presence_penalty=presence, frequency_penalty=frequency,
                **ON_FLAT_DATE)
    length = prompt_tokens(raw, TEXT_CHAT, [])
    ids, _ = raw.chat(TEXT_CHAT, [], 24, do_sample=False, processors=[OpenAIFormula(length, presence, frequency)])
    plain, _ = raw.chat(TEXT_CHAT, [], 24, do_sample=False)
    assert body["choices"][0]["message"]["content"] == raw.text(ids)
    assert ids != plain  # the penalty changed the answer


def test_repetition_penalty_as_transformers_applies_it(server, flat):
    uid, raw = flat
    body = chat(server, uid, max_tokens=24, temperature=0, repetition_penalty=0.5, **ON_FLAT_DATE)
    ids, _ = raw.chat(TEXT_CHAT, [], 24, do_sample=False, repetition_penalty=0.5)
    plain, _ = raw.chat(TEXT_CHAT, [], 24, do_sample=False)
    assert body["choices"][0]["message"]["content"] == raw.text(ids) and ids != plain


# -- all of them at once ----------------------------------------------------------------------


def test_a_mixed_batch_gives_each_request_its_answer_alone(server, chat_uid):
    """Each option used by a different concurrent request: every answer equals the same request sent alone."""
    requests = [
        {"messages": IMAGE_CHAT, "max_tokens": 30, "temperature": 0, "response_format": JSON_SCHEMA},
        {"messages": IMAGE_CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2},
        {"messages": TEXT_CHAT, "max_tokens": 10, "temperature": 1.0, "seed": 3, "n": 2},
        {"messages": TEXT_CHAT, "max_tokens": 10, "temperature": 1.0, "seed": 11},
        {"messages": TEXT_CHAT, "max_tokens": 16, "temperature": 0, "presence_penalty": -2.0},
        {"messages": TEXT_CHAT, "max_tokens": 16, "temperature": 0, "frequency_penalty": 1.0, "stop": ["e"]},
        {"messages": IMAGE_CHAT, "max_tokens": 12, "temperature": 0},
        {"messages": TEXT_CHAT, "max_tokens": 16, "temperature": 0, "repetition_penalty": 0.5},
    ]

    def answer(body):
        got = chat(server, chat_uid, **body)
        return [(c["message"]["content"], c["logprobs"] and [round(e["logprob"], 4) for e in c["logprobs"]["content"]])
                for c in got["choices"]], got["usage"]

    alone = [answer(body) for body in requests]
    with ThreadPoolExecutor(len(requests) * 2) as pool:
        together = list(pool.map(answer, requests * 2))
    for i, got in enumerate(together):
        want = alone[i % len(requests)]
        assert got[0] == want[0] or _close(got[0], want[0]), (requests[i % len(requests)], got, want)
        assert got[1] == want[1]


def _close(got, want):
    """The same texts; logprobs equal to 1e-4 (batched matrix products may differ in the last bits)."""
    return [g[0] for g in got] == [w[0] for w in want] and all(
        (g[1] is None) == (w[1] is None) and (g[1] is None or all(abs(a - b) <= 1e-4 for a, b in zip(g[1], w[1])))
        for g, w in zip(got, want))


# -- refusals ---------------------------------------------------------------------------------

#: A value each refused parameter is refused with (every refused one in the table must be here).
REFUSED = {"tool_choice": "required", "logit_bias": {"42": 5}, "best_of": 2, "echo": True, "suffix": "end",
           "audio": {"voice": "alloy", "format": "mp3"}, "modalities": ["text", "audio"],
           "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "reasoning_effort": "low",
           "verbosity": "low", "functions": [{"name": "f"}], "function_call": "auto", "ignore_eos": True,
           "lora_name": "mine"}


def test_every_refused_option_has_a_sample():
    assert set(REFUSED) == {o.name for o in OPTIONS + EXTENSIONS if o.refused}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_options_are_a_400_naming_them(server, chat_uid, base_uid, name):
    option = next(o for o in OPTIONS + EXTENSIONS if o.name == name)
    for endpoint in option.endpoints:
        if endpoint == CHAT:
            path, body = "/v1/chat/completions", {"model": chat_uid, "messages": TEXT_CHAT}
        else:
            path, body = "/v1/completions", {"model": base_uid, "prompt": "<|begin_of_text|>Hi"}
        for streaming in (False, True):
            status, answer = server.post(path, {**body, name: REFUSED[name], "max_tokens": 2, "stream": streaming})
            assert status == 400 and answer["error"]["message"].startswith(f"{name}: "), (endpoint, answer)


@pytest.mark.parametrize("body, message", [
    ({"n": 0}, "n: must be between 1 and 16, got 0"),
    ({"n": 2, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "n: tool calls"),
    ({"top_logprobs": 3}, 'top_logprobs: needs "logprobs": true as well'),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs: must be between 0 and 20, got 21"),
    ({"seed": "seven"}, "seed: expected a number"),
    ({"presence_penalty": 3}, "presence_penalty: must be between -2 and 2"),
    ({"top_p": 0}, "top_p: must be above 0 and at most 1"),
    ({"temperature": 2.5}, "temperature: must be between 0 and 2"),
    ({"max_tokens": 0}, "max_tokens: must be >= 1"),
    ({"response_format": {"type": "yaml"}}, "response_format.type: expected"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema: expected a JSON Schema object"),
])
def test_bad_option_values_are_a_400(server, chat_uid, body, message):
    status, answer = server.post("/v1/chat/completions", {"model": chat_uid, "messages": TEXT_CHAT, **body})
    assert status == 400 and answer["error"]["message"].startswith(message), answer


def test_options_outside_the_table_pass_through_as_xinference_passes_them(server, chat_uid):
    status, body = server.post("/v1/chat/completions", {"model": chat_uid, "messages": TEXT_CHAT, "max_tokens": 2,
                                                        "some_other_servers_option": 1, "user": "u1", "store": False})
    assert status == 200, body


def test_a_client_that_hangs_up_on_n_streams_frees_every_choice(server, chat_uid):
    """A stream of ``n: 3`` long answers closed after its first chunk: all three rows leave the batch
    (the model's log says so for each), and the model answers the next request."""
    import re
    import time

    left = re.compile(r"a request left the batch after \d+ of 2000 tokens: (?:the client went away|the request was aborted)")
    before = len(left.findall(server.log.read_text()))
    client = server.openai()
    reply = client.chat.completions.create(model=chat_uid, messages=TEXT_CHAT, max_tokens=2000, n=3, stream=True,
                                           temperature=1.0, seed=1)
    next(iter(reply))
    reply.close()
    deadline = time.time() + 30
    while len(left.findall(server.log.read_text())) < before + 3 and time.time() < deadline:
        time.sleep(0.5)
    assert len(left.findall(server.log.read_text())) == before + 3
    assert chat(server, chat_uid, max_tokens=3, temperature=0)["choices"][0]["finish_reason"] == "length"
