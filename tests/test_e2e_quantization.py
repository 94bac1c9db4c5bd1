"""Quantized Llama 3.2 Vision on the Transformers engine, end to end: a real ``xinference-local``,
launched through the real CLI with ``--quantization 8-bit`` / ``4-bit`` (bitsandbytes on load, its
CPU backend here) and with a pre-quantized nf4 checkpoint (``--model-format bnb``). Every answer
equals raw transformers loading the same checkpoint with the ``BitsAndBytesConfig`` written out here
(greedy): the vision tower, the projector and ``lm_head`` kept in 16 bits, everything else of the
text decoder quantized.
"""

from __future__ import annotations

import shutil

import pytest

from oracle import Reference
from parity import BLUE, MAX, RED, ask, image_message

KEEP = ["model.vision_model", "model.multi_modal_projector", "lm_head"]


def bnb(quantization):
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8-bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=KEEP)


@pytest.fixture(scope="module", params=["8-bit", "4-bit"])
def quantized(request, launched, tiny_checkpoint):
    q = request.param
    chat = launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--quantization", q)
    base = launched("llama-3.2-vision", "--disable-virtual-env", "--quantization", q)
    return q, chat, base, Reference(tiny_checkpoint, quantization_config=bnb(q))


@pytest.mark.parametrize("image", [RED, BLUE], ids=["red", "blue"])
def test_quantized_chat_with_an_image_equals_raw_transformers(server, quantized, image):
    q, chat, _, raw = quantized
    messages = image_message(image)
    expected, prompt_tokens, n = raw.generate(raw.render(messages), [image], MAX)
    reply = ask(server, chat, messages)
    assert reply.choices[0].message.content == expected
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, n)


def test_quantized_streaming_equals_raw_transformers(server, quantized):
    q, chat, _, raw = quantized
    messages = image_message(RED, "Describe it.")
    stream = ask(server, chat, messages, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == raw.generate(raw.render(messages), [RED], MAX)[0]


def test_quantized_base_completion_with_an_image(server, quantized):
    q, _, base, raw = quantized
    reply = server.openai().completions.create(model=base, prompt="<|image|>Caption:", max_tokens=MAX, temperature=0,
                                               extra_body={"images": [__import__("oracle").data_uri(BLUE)]})
    assert reply.choices[0].text == raw.generate("<|image|><|begin_of_text|>Caption:", [BLUE], MAX)[0]


def test_4_bit_is_really_quantized(server, launched, tiny_checkpoint, reference):
    """nf4 changes this checkpoint's answer (the unquantized model answers otherwise), so the equal
    answers above are the quantized model's, not the plain one's (int8 keeps this answer: no such check)."""
    chat = launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--quantization", "4-bit")
    raw = Reference(tiny_checkpoint, quantization_config=bnb("4-bit"))
    messages = image_message(RED)
    plain = reference.generate(reference.render(messages), [RED], MAX)[0]
    assert ask(server, chat, messages).choices[0].message.content == raw.generate(raw.render(messages), [RED], MAX)[0] != plain


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory, tiny_checkpoint):
    """A pre-quantized nf4 checkpoint, saved by transformers as the unsloth repositories are."""
    from transformers import MllamaForConditionalGeneration

    out = tmp_path_factory.mktemp("nf4")
    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization_config=bnb("4-bit"))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                 "processor_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json"):
        src = __import__("pathlib").Path(tiny_checkpoint) / name
        if src.exists() and not (out / name).exists():
            shutil.copy(src, out / name)
    return str(out)


def test_a_prequantized_nf4_checkpoint(server, nf4_checkpoint):
    uid = server.launch("llama-3.2-vision-instruct", "nf4-chat", nf4_checkpoint, "--disable-virtual-env",
                        "--model-format", "bnb", "--quantization", "4-bit")
    raw = Reference(nf4_checkpoint)
    messages = image_message(BLUE)
    assert ask(server, uid, messages).choices[0].message.content == raw.generate(raw.render(messages), [BLUE], MAX)[0]
    server.cli("terminate", "--model-uid", uid)


@pytest.mark.parametrize("engine, fmt, quantization, words", [
    ("transformers", "fp8", "FP8", "FP8 checkpoints are served by the vLLM engine"),
    ("transformers", "pytorch", "3-bit", None),
])
def test_variants_an_engine_does_not_serve_are_refused_at_launch(server, tiny_checkpoint, engine, fmt, quantization, words):
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", engine,
                        "--model-format", fmt, "--quantization", quantization, "--model_path", tiny_checkpoint,
                        "--model-uid", f"refused-{fmt}", "--disable-virtual-env", check=False)
    assert result.returncode != 0
    if words:
        assert words in result.stdout + result.stderr
