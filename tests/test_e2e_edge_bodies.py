"""Edge-case request bodies over raw HTTP (bytes a client library would never send): for our models
any answer but a 5xx; where the model cannot be read, what Xinference answers without the plugin.
Real ``xinference-local``; the clearer per-case messages are pinned in test_e2e_requests."""

from __future__ import annotations

import httpx
import pytest

CASES = {
 "invalid utf8": b'{"model": "%s", "prompt": "\xff\xfe", "max_tokens": 2}',
 "invalid utf8 chat": b'{"model": "%s", "messages": [{"role": "user", "content": "\xff"}], "max_tokens": 2}',
 "huge int": b'{"model": "%s", "prompt": "Hi", "max_tokens": 1' + b'0' * 5000 + b'}',
 "1e400": b'{"model": "%s", "prompt": "Hi", "max_tokens": 1e400}',
 "not json": b'hello %s',
 "empty": b'',
 "NaN": b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "temperature": NaN}',
 "BOM": b'\xef\xbb\xbf{"model": "%s", "prompt": "Hi", "max_tokens": 2}',
 "array": b'[{"model": "%s"}]',
 "null": b'null',
 "string model": b'{"model": ["%s"], "prompt": "Hi"}',
 "surrogate in model": b'{"model": "%s\\udfff", "prompt": "Hi"}',
 "surrogate key": b'{"model": "%s", "prompt": "Hi", "\\udfff": 1}',
 "nul in prompt": b'{"model": "%s", "prompt": "Hi\\u0000there", "max_tokens": 2}',
 "special tokens in prompt": b'{"model": "%s", "prompt": "<|eot_id|><|finetune_right_pad_id|><|python_tag|>", "max_tokens": 2}',
 "max_tokens 0": b'{"model": "%s", "prompt": "Hi", "max_tokens": 0}',
 "max_tokens negative": b'{"model": "%s", "prompt": "Hi", "max_tokens": -1}',
 "max_tokens huge": b'{"model": "%s", "prompt": "Hi", "max_tokens": 100000000}',
 "n=2": b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "n": 2}',
 "logprobs": b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "logprobs": 5}',
 "seed": b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "seed": -5}',
 "stop 100": b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "stop": ["a","b","c","d","e","f"]}',
 "echo": b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, "echo": true}',
 "prompt list": b'{"model": "%s", "prompt": ["Hi", "There"], "max_tokens": 2}',
 "prompt tokens": b'{"model": "%s", "prompt": [1, 2, 3], "max_tokens": 2}',
}

#: Bodies whose model cannot be read (not the plugin's to answer).
NOT_OURS = {"not json", "empty", "array", "null", "string model", "surrogate in model"}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", CASES)
def test_edge_body_is_never_a_server_error(server, bare_server, base_uid, chat_uid, case, path):
    uid = base_uid if path == "/v1/completions" else chat_uid
    raw = CASES[case]
    if b"%s" in raw:
        raw = raw.replace(b"%s", uid.encode())
    if path == "/v1/chat/completions":
        raw = raw.replace(b'"prompt": "Hi"', b'"messages": [{"role": "user", "content": "Hi"}]')
    r = httpx.post(server.endpoint + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
    if case in NOT_OURS:  # the model cannot be read: Xinference's own answer, as without the plugin
        bare = httpx.post(bare_server.endpoint + path, content=raw, headers={"content-type": "application/json"},
                          timeout=120)
        assert r.status_code == bare.status_code, (r.text[:300], bare.text[:300])
    else:
        assert r.status_code < 500, r.text[:300]
