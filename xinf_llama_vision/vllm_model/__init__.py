"""Llama 3.2 Vision (Mllama) for vLLM's V1 engine (vLLM >= 0.32), registered as a vLLM plugin.

vLLM removed its own Mllama after 0.10.2 (V0). This package's model runs on V1's
encoder-decoder path (Whisper's): the vision tower is the encoder, its tiles are the encoder
sequence, and the text decoder's cross-attention layers read them from vLLM's cross-attention
KV cache. :func:`register` is the ``vllm.general_plugins`` entry point, so ``vllm serve DIR``
and ``vllm.LLM(DIR)`` find it once this package is installed.
"""

from __future__ import annotations

ARCHITECTURE = "MllamaForConditionalGeneration"
MODEL = "xinf_llama_vision.vllm_model.model:MllamaForConditionalGeneration"


def register() -> None:
    """vLLM's plugin hook, run in every vLLM process: register our Mllama with vLLM >= 0.32 (idempotent,
    lazy).

    Older vLLMs (up to 0.10.2) keep their own Mllama for V0, with Meta's masks for the tokens that see no
    image (:mod:`xinf_llama_vision.compat.vllm_v0_mllama`).
    """
    import vllm
    from packaging.version import Version
    from vllm import ModelRegistry

    from ..schema import VLLM_MAX, VLLM_MIN, VLLM_V1_MIN  # the lines of vLLM's Mllama (V0) and ours (V1)

    version = Version(Version(vllm.__version__).base_version)
    if Version(VLLM_MIN) <= version <= Version(VLLM_MAX):
        from ..compat.vllm_v0_mllama import patch

        patch()
    if version < Version(VLLM_V1_MIN):
        return
    from ..compat.vllm_v1_mllama_config import declare_encoder_decoder

    declare_encoder_decoder()
    ModelRegistry.register_model(ARCHITECTURE, MODEL)
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[ARCHITECTURE] = _Eager


class _Eager:
    """vLLM's per-architecture config hook: run eagerly (no torch.compile, no CUDA graphs).

    The model reads each step's attention metadata on the host and builds the prompt's
    cross-attention masks in Python (:mod:`.model`), which a captured graph cannot replay.
    """

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if not vllm_config.model_config.enforce_eager:
            from vllm.logger import init_logger

            init_logger(__name__).info("Llama 3.2 Vision (Mllama) on vLLM V1 runs eagerly: enforce_eager set")
            vllm_config.model_config.enforce_eager = True

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return None
