"""Meta's Llama 3.2 Vision in the vLLM stage's environment (transformers 4.53, vLLM 0.9.2): every prompt
shape of :mod:`fidelity` against :class:`meta_reference.MetaMllama` on the structural checkpoint.

* The Transformers engine on transformers 4.x: all shapes (4.53's vision tower is Meta's; its
  cross-attention lets text before the first image see it, which the plugin's patch removes).
* vLLM's own Mllama (V0): one image per prompt, with the plugin's patch for the tokens that see no
  image (:mod:`xinf_llama_vision.compat.vllm_v0_mllama`); two or more images per prompt are refused in
  words, at launch and per request, since vLLM's Mllama answers them unlike Meta's model.

Before the fidelity work, both answered 6 of the 8 shapes unlike Meta's model: every chat with an
image (the base completion, whose image comes first, and text only agreed; docs/fidelity.md).
"""

from __future__ import annotations

import pytest

from fidelity import CASES, ask, check, launch_families, meta, structural_checkpoint  # noqa: F401 - fixtures
from xinf_llama_vision.compat.vllm_v0_mllama import ONE_IMAGE

TWO_IMAGES = [name for name, case in CASES.items() if len(case.images) > 1]
ONE_OR_NONE = [name for name in CASES if name not in TWO_IMAGES]


@pytest.fixture(scope="module")
def transformers_uid_of(server, structural_checkpoint):
    yield from launch_families(server, lambda name, uid: server.launch(
        name, uid, structural_checkpoint, "--disable-virtual-env", "--max_images", "2"), "structural-tf")


@pytest.mark.parametrize("name", CASES)
def test_the_transformers_engine_on_4x_answers_as_meta(server, transformers_uid_of, meta, name):
    import transformers

    assert transformers.__version__.startswith("4."), transformers.__version__
    check(ask(server, transformers_uid_of, name), meta[name], name)


@pytest.fixture(scope="module")
def vllm_uid_of(server, vllm_launch, structural_checkpoint, transformers_uid_of):
    """Both families on vLLM's own Mllama, one engine at a time (after the Transformers engine's)."""
    current = {}

    def uid_of(kind):
        if kind not in current:
            for uid in current.values():
                server.cli("terminate", "--model-uid", uid)
            current.clear()
            name = "llama-3.2-vision-instruct" if kind == "instruct" else "llama-3.2-vision"
            current[kind] = vllm_launch(name, f"structural-v0-{kind}", path=structural_checkpoint)
        return current[kind]

    yield uid_of
    for uid in current.values():
        server.cli("terminate", "--model-uid", uid)


@pytest.mark.parametrize("name", ONE_OR_NONE)  # chats first, then the base completion: one launch each
def test_vllms_own_mllama_answers_one_image_as_meta(server, vllm_uid_of, structural_checkpoint, meta, name):
    """Meta's tokens; their text as vLLM 0.9.2 writes it, which keeps Llama's reserved special tokens
    (``<|reserved_special_token_N|>``, marked special in the tokenizer but not among its
    ``all_special_ids``) where transformers' decode drops them."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(structural_checkpoint)
    want = meta[name]
    stop = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
    kept = [i for i in want.ids if i not in tokenizer.all_special_ids and i not in stop]
    text = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    check(ask(server, vllm_uid_of, name), replace(want, text=text), name)


@pytest.mark.parametrize("name", TWO_IMAGES)
def test_two_images_on_vllms_own_mllama_are_a_400_naming_the_alternatives(server, vllm_uid_of, name):
    from fidelity import DATE

    status, answer = server.post("/v1/chat/completions", {
        "model": vllm_uid_of("instruct"), "messages": CASES[name].messages, "max_tokens": 4,
        "chat_template_kwargs": {"date_string": DATE}})
    assert status == 400, answer
    assert answer["error"]["message"] == (
        f"messages: 2 images sent, this model accepts at most 1 per request (launch option max_images); {ONE_IMAGE}")


def test_a_launch_for_two_images_on_vllms_own_mllama_is_refused_in_words(server, structural_checkpoint):
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "vllm",
                        "--model_path", structural_checkpoint, "--model-uid", "v0-two-images", "--disable-virtual-env",
                        "--max_images", "2", check=False)
    assert result.returncode != 0
    assert f"launch option max_images 2: {ONE_IMAGE}" in result.stdout + result.stderr


def test_the_host_flags_whole_requests_only():
    """What the patch is for, read off vLLM's own method (kept by the patch): every token of a request
    with images is flagged as seeing one, text before the image included. If vLLM changes this, the
    patch's premise (and docs/fidelity.md) must be checked again."""
    from types import SimpleNamespace

    from vllm.model_executor.models.mllama import MllamaForConditionalGeneration

    from xinf_llama_vision.compat.vllm_v0_mllama import patch

    patch()
    original = MllamaForConditionalGeneration._xlv_original_rows
    metadata = SimpleNamespace(num_prefill_tokens=7, seq_lens=[4, 3], encoder_seq_lens=[1601, 0])
    flags = original(None, metadata, "cpu")
    assert flags[:, 0].tolist() == [True] * 4 + [False] * 3
