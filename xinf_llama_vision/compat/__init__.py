"""Every patch to a host library, in one place: each module names what it changes, why, the versions it
is for, and the test that fails when the host changes under it. Nothing here imports the rest of the
plugin except :mod:`..errors`.

Xinference (>= 4.0, < 5; tests/test_compat.py, tests/test_compat_xinference.py):

* :mod:`.xinference_api`: the chat, completion and launch routes run the plugin's checks inside them,
  and their answers pass through its refusal check (objects of the API process, not classes).
* :mod:`.xinference_download`: a failed download of our weights says what to do (``LLMCacheManager.cache``).
* :mod:`.xinference_refresh`: a refresh of Xinference's built-in catalog keeps our families.

transformers (tests/test_compat.py, tests/test_fidelity.py):

* :mod:`.transformers_mllama`: the Mllama models the Transformers engine loads compute what Meta's
  architecture computes (intermediate vision layers, tokens that see no image); per model instance,
  only where transformers' behaviour differs (docs/fidelity.md).
* :mod:`.transformers_generation`: the logits processors ``generate`` would build, for the scheduler
  (two private methods of ``GenerationMixin``).

vLLM (tests/vllm/test_compat_v0.py, tests/vllm_v1/test_compat_v1.py, tests/vllm/test_fidelity_v0.py):

* :mod:`.vllm_v0_mllama`: vLLM's own Mllama (0.6.3 to 0.10.2, V0) masks the tokens that see no image as
  Meta does.
* :mod:`.vllm_engine`: on one engine instance, V0 prompts kept as given (no second BOS) and JSON
  answers without optional whitespace.
* :mod:`.vllm_v1_mllama_config`: in vLLM >= 0.32's processes, ``MllamaConfig`` says
  ``is_encoder_decoder``, so V1 takes its encoder-decoder path for our Mllama.
"""
