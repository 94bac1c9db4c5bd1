"""OpenAI request options through ``--model-engine vllm``, over HTTP, on both vLLM stages: ``n`` (which
Xinference's REST layer drops and the plugin carries), ``response_format`` (compact JSON included),
``logprobs`` (the model's own, under sampling too: :mod:`sampled_logprobs`), ``seed``, penalties, stop
strings (:mod:`parity`) and the refusals, checked rather than assumed.

A stage's module defines the fixtures ``uid`` (an instruct model on its engine), ``raw``, ``flat``
(``(uid, Raw)`` on a flatter-logit checkpoint) and ``separators`` (its JSON separators, docs/api.md) and imports these tests (``from vllm_options import *``).
Answers are compared with raw transformers (:class:`oracle.Raw`) only over the tokens the reference
chooses by a clear margin: vLLM's CPU kernels round differently, and the tiny random checkpoint has
near ties (see ``test_e2e_vllm_load``).
"""


from __future__ import annotations

import json
import math
import re

import pytest
import torch

from oracle import OpenAIFormula
from sampled_logprobs import check_constrained_logprobs, check_partial_character_bytes, check_sampled_logprobs
from test_e2e_options import IMAGE_CHAT, JSON_SCHEMA, RED, SCHEMA, TEXT_CHAT  # the same requests as on Transformers

MARGIN = 0.5


def clear(logits):
    """How many leading steps the reference chose by more than ``MARGIN`` (top-2 gap of its logits)."""
    n = 0
    for row in logits:
        top = torch.topk(row.float(), 2).values
        if float(top[0] - top[1]) <= MARGIN:
            break
        n += 1
    return n


def chat(server, uid, messages=TEXT_CHAT, **options):
    status, body = server.post("/v1/chat/completions", {"model": uid, "messages": messages, **options})
    assert status == 200, body
    return body


def test_n_three_choices_through_vllm(server, uid):
    body = chat(server, uid, IMAGE_CHAT, max_tokens=8, temperature=1.0, seed=3, n=3, logprobs=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) == 3
    assert [len(c["logprobs"]["content"]) for c in body["choices"]] == [8, 8, 8]
    assert body["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("options", [{"temperature": 0}, {}])  # this checkpoint decodes greedily by default
def test_n_with_greedy_decoding_is_a_400_on_vllm(server, uid, options):
    status, body = server.post("/v1/chat/completions", {"model": uid, "messages": TEXT_CHAT, "n": 2, **options})
    assert status == 400 and body["error"]["message"].startswith("n: 2 choices need sampling on the vLLM engine"), body


def test_seed_through_vllm(server, uid):
    answers = [chat(server, uid, max_tokens=10, temperature=1.0, seed=s)["choices"][0]["message"]["content"]
               for s in (7, 7, 8)]
    assert answers[0] == answers[1] != answers[2]


def test_json_schema_through_vllm(server, uid):
    free = chat(server, uid, IMAGE_CHAT, max_tokens=30, temperature=0)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    answer = json.loads(chat(server, uid, IMAGE_CHAT, max_tokens=60, temperature=0,
                             response_format=fmt)["choices"][0]["message"]["content"])
    assert set(answer) == {"color", "round"} and answer["color"] in ("red", "green", "blue")
    assert isinstance(answer["round"], bool)


def test_logprobs_through_vllm_are_log_softmax_of_the_logits(server, uid, raw):
    ids, logits = raw.chat(IMAGE_CHAT, [RED], 8, do_sample=False)
    k = clear(logits)
    body = chat(server, uid, IMAGE_CHAT, max_tokens=k, temperature=0, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == k
    for entry, token, row in zip(content, ids, logits):
        expected = torch.log_softmax(row.float(), dim=-1)
        assert entry["token"] == raw.ref.tokenizer.decode([token])
        # vLLM's Mllama kernels are not transformers': measured 0.023 apart on this checkpoint (float32).
        assert math.isclose(entry["logprob"], float(expected[token]), abs_tol=0.05), (entry, float(expected[token]))
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the chosen token is the most likely
        assert len(entry["top_logprobs"]) == 2


@pytest.mark.parametrize("name, value", [("logit_bias", {"42": 5}), ("tool_choice", "required"),
                                         ("reasoning_effort", "low")])
def test_unsupported_options_are_a_400_on_vllm(server, uid, name, value):
    status, body = server.post("/v1/chat/completions", {"model": uid, "messages": TEXT_CHAT, name: value})
    assert status == 400 and body["error"]["message"].startswith(f"{name}: "), body


def test_sampled_logprobs_are_the_models_own_on_vllm(server, uid, raw):
    # vLLM's Mllama kernels are not transformers': measured 0.023 apart on this checkpoint (float32).
    check_sampled_logprobs(server.post, uid, raw, IMAGE_CHAT, [RED], tol=0.05)


def test_logprobs_with_a_format_are_over_what_it_allows_on_vllm(server, uid, raw, separators):
    check_constrained_logprobs(server.post, uid, raw, IMAGE_CHAT, [RED], JSON_SCHEMA, tol=0.05, separators=separators)


def test_logprob_bytes_are_each_tokens_own_on_vllm(server, uid, raw):
    check_partial_character_bytes(server.post, uid, raw.ref.tokenizer)


def outside_strings(text: str) -> str:
    """A JSON text without its string literals (``'{"a b": 1}'`` → ``'{: 1}'``)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', "", text)


@pytest.mark.parametrize("fmt", [{"type": "json_object"}, JSON_SCHEMA], ids=["json_object", "json_schema"])
def test_json_answers_are_compact_on_vllm(server, uid, fmt, separators):
    """No optional whitespace (``compat/vllm_engine.py``): outside its strings the answer has none but
    the engine's separators (docs/api.md)."""
    answer = chat(server, uid, IMAGE_CHAT, max_tokens=40, temperature=0, response_format=fmt)
    text = answer["choices"][0]["message"]["content"]
    item, key = separators or (", ", ": ")
    assert text.startswith("{") and not re.search(r"\s", outside_strings(text).replace(item, ",").replace(key, ":")), text


# Last: the flatter checkpoint's model replaces the first one.
@pytest.mark.parametrize("penalty", [{"presence_penalty": -2.0}, {"frequency_penalty": -2.0}])
def test_penalties_reach_vllm(server, flat, penalty):
    """On a checkpoint with flatter logits a negative penalty (rewarding repeats) changes the greedy
    answer. Its near ties rule out comparing vLLM's answer with raw transformers token by token, so
    this checks that vLLM applied the penalty: one request alone is deterministic, and the answer
    with the penalty differs from the answer without it (as it does in raw transformers)."""
    flat_uid, raw = flat
    length = int(raw.ref.inputs(raw.ref.render(TEXT_CHAT), [])["input_ids"].shape[1])
    presence, frequency = penalty.get("presence_penalty", 0.0), penalty.get("frequency_penalty", 0.0)
    ids, _ = raw.chat(TEXT_CHAT, [], 16, do_sample=False, processors=[OpenAIFormula(length, presence, frequency)])
    assert ids != raw.chat(TEXT_CHAT, [], 16, do_sample=False)[0]
    plain = chat(server, flat_uid, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    assert chat(server, flat_uid, max_tokens=16, temperature=0)["choices"][0]["message"]["content"] == plain
    penalized = chat(server, flat_uid, max_tokens=16, temperature=0, **penalty)["choices"][0]["message"]["content"]
    assert penalized != plain
