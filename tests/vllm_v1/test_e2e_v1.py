"""End to end on vLLM's V1 engine with this plugin's Mllama: ``xinference launch --model-engine vllm``
over HTTP, against raw transformers (greedy, float32, the same checkpoint), token for token.

The shared parity tests (:mod:`parity`, the ones the Transformers engine and vLLM's own V0 Mllama pass)
and the prompt shapes that only Mllama's cross-attention mask tells apart: a three-tile image, an image
in a later turn, two images with text between them (each text sees only its own image; the answer
sees the last) and two adjacent images (one group: both seen).
"""

from __future__ import annotations

import ast

import pytest

from parity import *  # noqa: F401,F403 - the shared parity tests, collected here
from parity import MAX, check_chat
from shapes import SHAPES, THREE_TILES


def test_the_model_is_ours_on_vllms_v1_engine(server, chat_uid):
    """What vLLM was handed and what it built, from the launch's log: our architecture's class, the
    V1 engine core, the CPU block size the plugin sets and the image limit of the launch."""
    log = server.log.read_text(errors="replace")
    marker = f"Loading {chat_uid} with following model config: "
    start = log.index(marker) + len(marker)
    config = ast.literal_eval(log[start:log.index("Enable lora", start)])
    assert {k: config.get(k) for k in ("block_size", "tensor_parallel_size", "limit_mm_per_prompt")} == \
        {"block_size": 32, "tensor_parallel_size": 1, "limit_mm_per_prompt": {"image": 2}}
    after = log[start:]
    assert "Resolved architecture: MllamaForConditionalGeneration" in after
    assert "EngineCore" in after and "V0 LLM engine" not in after


def test_the_three_tile_picture_has_three_tiles(reference):
    inputs = reference.inputs(reference.render(SHAPES["three-tile image"][0]), [THREE_TILES])
    assert inputs["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 0]]]  # 3 real tiles of 4


@pytest.mark.parametrize("shape", SHAPES)
def test_mllama_prompt_shapes_match_raw_transformers(server, chat_uid, reference, shape):
    check_chat(server, chat_uid, reference, *SHAPES[shape])


def test_the_mask_matters_in_these_shapes(reference):
    """The two-image prompts would answer differently if every token saw both images: the test above
    would catch a model without Mllama's per-token mask (checked on raw transformers with the mask
    replaced by 'all images' for every token after the first)."""
    import torch

    messages, images = SHAPES["two images, text between"]
    inputs = reference.inputs(reference.render(messages), images)
    mask = inputs["cross_attention_mask"].clone()
    first = int((mask[0, :, 0].sum(-1) > 0).nonzero()[0])
    mask[0, first:, :, :] = (inputs["aspect_ratio_mask"][0] > 0).long()
    with torch.no_grad():
        want = reference.model.generate(**inputs, max_new_tokens=MAX, do_sample=False)
        unmasked = reference.model.generate(**{**inputs, "cross_attention_mask": mask}, max_new_tokens=MAX,
                                            do_sample=False)
    assert want.tolist() != unmasked.tolist()
