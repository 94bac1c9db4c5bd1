"""The vLLM V1 internal ``xinf_llama_vision/compat/vllm_v1_mllama_config.py`` relies on: vLLM takes its
encoder-decoder path for a config that says ``is_encoder_decoder``, and transformers' ``MllamaConfig``
does not say it by itself (else the patch could go)."""

import subprocess
import sys

from transformers import MllamaConfig
from vllm.transformers_utils.config import is_encoder_decoder

from xinf_llama_vision.compat.vllm_v1_mllama_config import declare_encoder_decoder

CHECK = ("from transformers import MllamaConfig\n"
         "from vllm.transformers_utils.config import is_encoder_decoder\n"
         "print(is_encoder_decoder(MllamaConfig()))")


def test_without_the_patch_vllm_sees_no_encoder_decoder():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_with_it_vllm_does_and_the_patch_is_idempotent():
    declare_encoder_decoder()
    declare_encoder_decoder()
    assert is_encoder_decoder(MllamaConfig())
    assert MllamaConfig.from_dict(MllamaConfig().to_dict()).is_encoder_decoder
