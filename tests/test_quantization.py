"""The memory estimate and the quantization recipe, checked against the models themselves: parameter
counts equal ``sum(p.numel())`` of real ``MllamaForConditionalGeneration`` objects (the tiny checkpoints,
and 11B and 90B built on the meta device from Meta's published shapes), and the estimate reproduces the
model card's memory table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xinf_llama_vision.memory import ARCHITECTURES, GB, Architecture, DoesNotFit, check_fit, estimate, parameters
from xinf_llama_vision.quantization import FORMATS, refusal
from tiny import BENCH_TEXT, BENCH_VISION, TEXT, VISION, build

#: The model card's "Quantizations & VRAM" for 90B (../shared/seeds): GB at 16, 8 and 4.5 bits.
CARD_90B = {"none": 180.7, "8-bit": 89.8, "4-bit": 50.8}


def real_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shapes", [(TEXT, VISION), (BENCH_TEXT, BENCH_VISION)], ids=["tiny", "bench"])
def test_parameter_count_of_a_tiny_checkpoint_is_exact(tmp_path, shapes):
    from transformers import MllamaForConditionalGeneration

    path = build(str(tmp_path / "ckpt"), text=shapes[0], vision=shapes[1])
    model = MllamaForConditionalGeneration.from_pretrained(path)
    assert sum(parameters(Architecture.from_checkpoint(path)).values()) == real_count(model)


@pytest.mark.parametrize("size", [11, 90])
def test_parameter_count_of_the_released_sizes_is_exact(size):
    """Meta's shapes, given to transformers' own config by hand, built on the meta device (no memory)."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    hidden, inter, layers, heads = {11: (4096, 14336, 40, 32), 90: (8192, 28672, 100, 64)}[size]
    config = MllamaConfig(
        text_config=dict(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         cross_attention_layers=list(range(3, layers, 5)), num_attention_heads=heads,
                         num_key_value_heads=8),
        vision_config=dict(image_size=560, patch_size=14, max_num_tiles=4, hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_global_layers=8, vision_output_dim=7680),
    )
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    assert sum(parameters(ARCHITECTURES[size]).values()) == real_count(model)
    assert round(real_count(model) / 1e9, 1) == {11: 10.7, 90: 88.6}[size]  # Meta: "11B (10.6)", "90B (88.8)"


@pytest.mark.parametrize("quantization", sorted(CARD_90B))
def test_the_90b_estimate_matches_the_model_card(quantization):
    """16 bits is the same method as the card's; its 8- and 4.5-bit rows are GGUF's (Q8_0, Q4_K_M),
    close to bitsandbytes' int8 and nf4 but not the same, so those rows are a sanity check."""
    e = estimate(ARCHITECTURES[90], quantization, context_length=8192, max_num_seqs=1)
    card = CARD_90B[quantization] * GB
    assert abs(e.weights - card) / card < 0.05
    if quantization == "none":
        assert abs(e.total - card) / card < 0.05


def test_caches_grow_as_they_should():
    arch = ARCHITECTURES[11]
    one = estimate(arch, context_length=4096, max_num_seqs=1)
    assert estimate(arch, context_length=8192, max_num_seqs=1).kv_cache == 2 * one.kv_cache
    assert estimate(arch, context_length=4096, max_num_seqs=4).kv_cache == 4 * one.kv_cache
    # 32 self-attention layers x K and V x 8 heads x 128 x 2 bytes per token
    assert one.kv_cache == 32 * 2 * 8 * 128 * 2 * 4096
    # 8 cross-attention layers keep 4 tiles x 1601 tokens per image
    assert one.cross_cache == 8 * 2 * 8 * 128 * 2 * 4 * 1601
    assert estimate(arch, images_per_seq=2).cross_cache == 2 * one.cross_cache


def test_gpu_classes():
    assert estimate(ARCHITECTURES[90], "4-bit").gpus()[80] == 1  # "Can fit in a 80GB card" (unsloth's nf4)
    assert estimate(ARCHITECTURES[90], "none").gpus() == {24: None, 48: 8, 80: 4, 94: 4, 141: 2}
    assert estimate(ARCHITECTURES[11], "none").gpus()[24] == 2 and estimate(ARCHITECTURES[11], "4-bit").gpus()[24] == 1


def test_a_launch_that_does_not_fit_says_what_would():
    arch = ARCHITECTURES[90]
    need = estimate(arch, "none", context_length=8192)
    with pytest.raises(DoesNotFit) as e:
        check_fit(arch, need, [80 * GB, 80 * GB], ["none", "8-bit", "4-bit"])
    message = str(e.value)
    assert "needs about 182.9 GB" in message and "2 GPUs have 160.0 GB free" in message
    assert "--quantization 8-bit, --quantization 4-bit, --n-gpu 4" in message and "--skip_memory_check true" in message
    check_fit(arch, need, [80 * GB] * 3, [])  # 240 GB: fits, no error


def test_a_shorter_context_is_offered_when_it_is_what_fits():
    arch = ARCHITECTURES[11]
    need = estimate(arch, "none", context_length=131072)
    with pytest.raises(DoesNotFit, match=r"--max_model_len (\d+)") as e:
        check_fit(arch, need, [40 * GB], [])
    shorter = int(e.value.args[0].split("--max_model_len ")[1].split(".")[0].split(",")[0])
    assert estimate(arch, "none", context_length=shorter).total <= 40 * GB < need.total


def test_the_shorter_context_is_named_by_the_engines_own_option():
    """vLLM's option is --max_model_len; the Transformers engine's is --context_length (the other is ignored there)."""
    arch = ARCHITECTURES[11]
    need = estimate(arch, "none", context_length=131072)
    with pytest.raises(DoesNotFit) as e:
        check_fit(arch, need, [40 * GB], [], context_option="--context_length")
    assert "--context_length " in str(e.value) and "--max_model_len" not in str(e.value)


def test_estimate_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "xinf_llama_vision", "estimate", "--size", "90", "--quantization",
                          "4-bit", "--context-length", "8192", "--max-num-seqs", "16"],
                         capture_output=True, text=True, check=True).stdout
    e = estimate(ARCHITECTURES[90], "4-bit", 8192, 16)
    assert f"total            {e.total / GB:8.1f} GB" in out
    assert "    80 GB: 2 GPUs (--n-gpu 2)" in out and "   141 GB: 1 GPU (--n-gpu 1)" in out


def test_every_variant_is_served_by_exactly_the_engines_the_docs_name():
    served = {(fmt, q): [e for e in ("transformers", "vllm") if refusal(e, fmt, q) is None]
              for fmt, qs in FORMATS.items() for q in qs}
    assert served == {
        ("pytorch", "none"): ["transformers", "vllm"],
        ("pytorch", "8-bit"): ["transformers"],
        ("pytorch", "4-bit"): ["transformers"],
        ("bnb", "4-bit"): ["transformers"],
        ("fp8", "FP8"): ["vllm"],
    }
    assert "awq" in refusal("transformers", "awq", "Int4")
