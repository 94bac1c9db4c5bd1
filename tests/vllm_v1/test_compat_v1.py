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
