"""The vLLM V1 internal ``xinf_llama_vision/compat/vllm_v1_mllama_config.py`` relies on: vLLM takes its
encoder-decoder path for a config that says ``is_encoder_decoder``, and transformers' ``MllamaConfig``
does not say it by itself (else the patch could go). Each check in a child process: the patch is
process-wide by design (vLLM's processes), and this stage's raw-transformers references must not see it."""

import subprocess
import sys

CHECK = ("from transformers import MllamaConfig\n"
         "from vllm.transformers_utils.config import is_encoder_decoder\n"
         "{patch}"
         "print(is_encoder_decoder(MllamaConfig()), MllamaConfig.from_dict(MllamaConfig().to_dict()).is_encoder_decoder)")
PATCH = ("from xinf_llama_vision.compat.vllm_v1_mllama_config import declare_encoder_decoder\n"
         "declare_encoder_decoder()\ndeclare_encoder_decoder()\n")


def child(patch: str) -> str:
    out = subprocess.run([sys.executable, "-c", CHECK.format(patch=patch)], capture_output=True, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-3000:]


def test_without_the_patch_vllm_sees_no_encoder_decoder():
    assert child("") == "False False"


def test_with_it_vllm_does_and_the_patch_is_idempotent():
    assert child(PATCH) == "True True"


def test_requests_carry_structured_outputs_with_the_whitespace_switch():
    """vLLM >= 0.11 (this stage's 0.32) passes ``response_format`` as ``structured_outputs``: the compact-JSON
    switch of ``compat/vllm_engine.py`` must reach it there."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    from vllm_stage import sent_by_compact_json

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))
    assert params.structured_outputs.disable_any_whitespace is False
    assert sent_by_compact_json(params).structured_outputs.disable_any_whitespace is True


def test_the_xgrammar_backend_reads_the_engines_whitespace_switch():
    """Why our V1 launches set ``structured_outputs_config`` (``compat/vllm_engine.py``): vLLM 0.32's
    xgrammar backend takes ``disable_any_whitespace`` from the engine's config; the day it reads a request's
    own, the launch setting may go."""
    import inspect

    from vllm.v1.structured_output import backend_xgrammar

    source = inspect.getsource(backend_xgrammar)
    assert "structured_outputs_config.disable_any_whitespace" in source
    assert "params.disable_any_whitespace" not in source and "structured_outputs.disable_any_whitespace" not in source
