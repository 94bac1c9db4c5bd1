"""What ``logprobs`` mean under sampling, checked the same way on every engine (docs/api.md, "Logprobs").

The documented meaning: the log-softmax of the model's own logits for each step, over the tokens the
request's ``response_format`` allows, *before* penalties, temperature, top-k and top-p (vLLM V1's
``raw_logprobs``). The reference replays the answer's own tokens through raw transformers
(``generate`` forced to those tokens; its ``output_logits`` are the model's logits) and takes
``log_softmax`` there. An engine that reported the sampling distribution instead (vLLM V0's own
sampler: after temperature and top-p) is caught: :func:`check_sampled_logprobs` also checks that,
for the request it sends, that other reading is far from the documented one.

The answer's tokens are read back from each entry's ``bytes`` (a byte-level BPE token's bytes name
it exactly), so a wrong ``bytes`` fails here too.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
from transformers import LogitsProcessor

from xinf_llama_vision.generation import TokenBytes

#: The request: Meta's own sampling defaults, a penalty, and a seed (the answer itself does not matter).
SAMPLED = {"max_tokens": 8, "temperature": 0.6, "top_p": 0.9, "presence_penalty": 1.0, "seed": 11,
           "logprobs": True, "top_logprobs": 3}


class Force(LogitsProcessor):
    """Make ``generate`` choose ``ids``, one per step (its ``output_logits`` stay the model's own)."""

    def __init__(self, prompt_length: int, ids: List[int]):
        self.prompt_length, self.ids = prompt_length, ids

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.ids[step]] = 0
        return forced


_BY_BYTES: Dict[int, Dict[bytes, int]] = {}


def token_id(tokenizer, entry) -> int:
    """The token an entry names, by its ``bytes`` (unique for a byte-level BPE vocabulary)."""
    table = _BY_BYTES.get(id(tokenizer))
    if table is None:
        pieces = TokenBytes(tokenizer)
        table = _BY_BYTES[id(tokenizer)] = {pieces(i): i for i in range(len(tokenizer))}
    return table[bytes(entry["bytes"])]


def replay(raw, messages, images, ids, constraint=None):
    """The model's logits at each step of ``ids`` after the prompt; with ``constraint`` (a fresh logits
    processor), the logits it leaves (forbidden tokens at -inf)."""
    prompt = raw.render(messages)
    prompt_ids = raw.ref.inputs(prompt, images)["input_ids"][0].tolist()
    forced, logits = raw.run(prompt, images, len(ids), processors=[Force(len(prompt_ids), ids)], do_sample=False)
    assert forced == ids
    if constraint is None:
        return logits
    masked = []
    for step, row in enumerate(logits):
        masked.append(constraint(torch.tensor([prompt_ids + ids[:step]]), row[None].clone().float())[0])
    return masked


#: What a forbidden token's logprob reads (-inf has no JSON), as OpenAI and vLLM report it.
IMPOSSIBLE = -9999.0


def check_entries(content, expected_rows, tokenizer, tol, top):
    for entry, expected in zip(content, expected_rows):
        expected = expected.clamp(min=IMPOSSIBLE)
        token = token_id(tokenizer, entry)
        assert math.isclose(entry["logprob"], float(expected[token]), abs_tol=tol), (entry, float(expected[token]))
        for got in entry["top_logprobs"]:
            alt = token_id(tokenizer, got)
            assert math.isclose(got["logprob"], float(expected[alt]), abs_tol=tol), (got, float(expected[alt]))
        # The most likely alternatives by the documented distribution (vLLM lists the chosen token too,
        # in first place, where it is not among them).
        want = torch.topk(expected, top).values.tolist()
        best = sorted((got["logprob"] for got in entry["top_logprobs"]), reverse=True)[:top]
        assert all(g >= w - tol for g, w in zip(best, want)), (best, want)


def check_sampled_logprobs(post, uid, raw, messages, images, tol):
    """``post(path, body) -> (status, body)``: a sampled chat's logprobs are the model's own, not the
    sampling distribution's (temperature 0.6, top-p 0.9, a presence penalty)."""
    status, body = post("/v1/chat/completions", {"model": uid, "messages": messages, **SAMPLED})
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 1
    tokenizer = raw.ref.tokenizer
    ids = [token_id(tokenizer, entry) for entry in content]
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") == \
        raw.ref.tokenizer.decode(ids)  # the entries are the answer's tokens
    logits = replay(raw, messages, images, ids)
    rows = [torch.log_softmax(row.float(), dim=-1) for row in logits]
    check_entries(content, rows, tokenizer, tol, SAMPLED["top_logprobs"])
    # The other reading (the sampling distribution) is far from this one for the tokens reported: this
    # test tells them apart.
    scaled = [torch.log_softmax(row.float() / SAMPLED["temperature"], dim=-1) for row in logits]
    reported = [(s, r, token_id(tokenizer, alt)) for s, r, entry in zip(scaled, rows, content)
                for alt in entry["top_logprobs"]]
    assert max(abs(float(s[i]) - float(r[i])) for s, r, i in reported) > 20 * tol


def check_constrained_logprobs(post, uid, raw, messages, images, response_format, tol, separators=None):
    """With ``response_format``, logprobs are over what the format allows (the model's logits masked by
    the grammar, renormalized), as vLLM V1 reports them. ``separators``: the engine's JSON separators
    (vLLM V1 compiles ``(",", ":")``, the others xgrammar's default without optional whitespace)."""
    status, body = post("/v1/chat/completions", {"model": uid, "messages": messages, "max_tokens": 12,
                                                 "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                                 "response_format": response_format})
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    tokenizer = raw.ref.tokenizer
    ids = [token_id(tokenizer, entry) for entry in content]
    masked = replay(raw, messages, images, ids, raw.grammar(response_format, separators))
    rows = [torch.log_softmax(row.float(), dim=-1) for row in masked]
    check_entries(content, rows, tokenizer, tol, 2)
    free = [torch.log_softmax(row.float(), dim=-1) for row in replay(raw, messages, images, ids)]
    assert max(abs(float(f[i]) - float(r[i])) for f, r, i in zip(free, rows, ids)) > 20 * tol


def check_partial_character_bytes(post, uid, tokenizer):
    """Among an answer's top-20 alternatives, some tokens are only part of a character (their text
    alone is U+FFFD): each entry's ``bytes`` are its token's own (a token of the vocabulary whose text
    is the entry's), some are not UTF-8 on their own, and the chosen tokens' bytes joined are the
    answer. (Bytes taken from each token's text, as Xinference derives them, are always UTF-8: the
    second check fails on them.)"""
    status, body = post("/v1/chat/completions", {
        "model": uid, "messages": [{"role": "user", "content": "写一首关于猫的诗 🐱"}], "max_tokens": 24,
        "temperature": 0, "logprobs": True, "top_logprobs": 20})
    assert status == 200, body
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    entries = content + [alt for entry in content for alt in entry["top_logprobs"]]
    for entry in entries:
        assert tokenizer.decode([token_id(tokenizer, entry)]) == entry["token"], entry
    assert any(not _utf8(bytes(entry["bytes"])) for entry in entries)
    answer = b"".join(bytes(entry["bytes"]) for entry in content).decode("utf-8", "replace")
    assert answer.startswith(choice["message"]["content"])  # the end-of-turn token's text is not in the answer


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
