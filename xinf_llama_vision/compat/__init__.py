"""Patches to host libraries, each for the versions it names, in one place (see docs/fidelity.md).

* :mod:`.transformers_mllama`: the Mllama models the Transformers engine loads compute what Meta's
  architecture computes (intermediate vision layers, tokens that see no image); per model instance,
  only where transformers' behaviour differs.
* :mod:`.vllm_v0_mllama`: vLLM's own Mllama (vLLM 0.6.3 to 0.10.2, V0 engine) masks the tokens that see
  no image as Meta does.
"""
