"""``logprobs[].bytes``: each token's own bytes, on the real Llama 3.2 tokenizer, where a token may hold
only part of a character (emoji, CJK, accented letters): joined, the bytes are the text's UTF-8."""

import pytest
from transformers import PreTrainedTokenizerFast

from tiny import tokenizer_dir
from xinf_llama_vision.generation import TokenBytes

TEXTS = ["Un café à Zürich, s'il vous plaît 😀🎉", "今日は良い天気ですね。龘靐齉爩鱻麤", "🦙 + 🖼️ = Llama 3.2 Vision 👀"]


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())


@pytest.mark.parametrize("text", TEXTS)
def test_joined_bytes_are_the_texts_utf8(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    assert b"".join(token_bytes(i) for i in ids) == text.encode("utf-8")
    # The case the field exists for: some of these tokens are part of a character, so their text
    # alone is U+FFFD, and the text's bytes (what an engine would report reading only the text) are wrong.
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "the text should have tokens that are parts of a character"
    assert b"".join(tokenizer.decode([i]).encode() for i in ids) != text.encode("utf-8")


def test_special_tokens_are_their_text(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert TokenBytes(tokenizer)(eot) == b"<|eot_id|>"
