"""The vLLM V0 internals ``xinf_llama_vision/compat/vllm_engine.py`` relies on, in vLLM's own classes:
each test fails when the installed vLLM changes under the patch."""

import inspect

from vllm.engine.async_llm_engine import _AsyncLLMEngine  # V0's engine (the public name follows VLLM_USE_V1)
from vllm.inputs.preprocess import InputPreprocessor
from vllm.sampling_params import GuidedDecodingParams, SamplingParams

from xinf_llama_vision.compat import vllm_engine


def test_the_v0_preprocessor_still_adds_the_decoder_start_token_in_the_method_we_replace():
    assert list(inspect.signature(InputPreprocessor._prepare_decoder_input_ids_for_generation).parameters) == [
        "self", "decoder_input_ids"]
    assert "_prepare_decoder_input_ids_for_generation" in inspect.getsource(InputPreprocessor)
    assert "self.input_preprocessor" in inspect.getsource(_AsyncLLMEngine)  # what keep_decoder_prompt reaches


def test_keep_decoder_prompt_keeps_a_prompt_and_leaves_an_empty_one_to_vllm():
    class Preprocessor:
        def _prepare_decoder_input_ids_for_generation(self, ids):
            return [128000] + list(ids or [])

    engine = type("Engine", (), {})()
    engine.engine = type("Inner", (), {"input_preprocessor": Preprocessor()})()
    assert vllm_engine.keep_decoder_prompt(engine)
    prepare = engine.engine.input_preprocessor._prepare_decoder_input_ids_for_generation
    assert prepare([128256, 128000, 9]) == [128256, 128000, 9]
    assert prepare([]) == [128000]
    assert not vllm_engine.keep_decoder_prompt(type("Bare", (), {})())


def test_requests_carry_guided_decoding_with_the_whitespace_switch():
    params = SamplingParams(guided_decoding=GuidedDecodingParams(json_object=True))
    assert params.guided_decoding.disable_any_whitespace is False
    seen = []
    engine = type("Engine", (), {"generate": lambda self, prompt, sampling_params, *a, **k: seen.append(sampling_params)})()
    engine.generate = engine.generate.__get__(engine)
    vllm_engine.compact_json(engine)
    engine.generate("p", params)
    assert seen[0].guided_decoding.disable_any_whitespace is True
