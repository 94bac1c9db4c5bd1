"""The vLLM V0 internals ``xinf_llama_vision/compat/vllm_engine.py`` relies on, in vLLM's own classes:
each test fails when the installed vLLM changes under the patch."""

import inspect

from vllm.engine.async_llm_engine import _AsyncLLMEngine  # V0's engine (the public name follows VLLM_USE_V1)
from vllm.inputs.preprocess import InputPreprocessor
from vllm.sampling_params import GuidedDecodingParams, SamplingParams

from vllm_stage import sent_by_compact_json
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
    sent = sent_by_compact_json(params).guided_decoding
    # V0's xgrammar backend applies the switch to schemas only: json_object goes as the schema of any object.
    assert (sent.disable_any_whitespace, sent.json, sent.json_object) == (True, vllm_engine.JSON_OBJECT, None)


def test_v0s_sampler_still_reports_the_logprobs_of_what_it_samples_from_through_get_logprobs():
    """What ``compat/vllm_v0_sampler.py`` replaces: ``Sampler.forward`` scales the logits in place by the
    temperatures, then hands ``get_logprobs`` (a module function, looked up at call time) their log-softmax."""
    from vllm.model_executor.layers import sampler

    source = inspect.getsource(sampler.Sampler.forward)
    assert source.index("logits.div_(") < source.index("torch.log_softmax(logits") < source.index("get_logprobs(")
    assert list(inspect.signature(sampler.get_logprobs).parameters)[:3] == [
        "logprobs", "sampling_metadata", "sample_results"]


def test_model_logprobs_hands_get_logprobs_the_models_own_only_while_its_sampler_runs():
    import torch
    from vllm.model_executor.layers import sampler as module

    seen = []
    original = module.get_logprobs
    module.get_logprobs = lambda logprobs, metadata, results: seen.append(logprobs)
    try:
        class Sampler:
            def forward(self, logits, metadata):
                logits.div_(0.5)  # temperature, in place, as V0's does
                module.get_logprobs(torch.log_softmax(logits, dim=-1), metadata, None)

        runner = type("Runner", (), {"sampler": Sampler()})()
        worker = type("Worker", (), {"model_runner": runner})()
        wrapper = type("Wrapper", (), {"worker": worker})()
        engine = type("E", (), {})()
        engine.engine = type("Inner", (), {"model_executor": type("X", (), {"driver_worker": wrapper})()})()
        from xinf_llama_vision.compat.vllm_v0_sampler import model_logprobs

        assert model_logprobs(engine)
        params = type("P", (), {"logprobs": 2, "prompt_logprobs": None})()
        metadata = type("M", (), {"seq_groups": [type("G", (), {"sampling_params": params})()]})()
        logits = torch.tensor([[1.0, 2.0, 3.0]])
        runner.sampler.forward(logits.clone(), metadata)
        module.get_logprobs(torch.zeros(1, 3), metadata, None)  # no step of ours in flight: as given
        assert torch.allclose(seen[0], torch.log_softmax(logits, dim=-1))
        assert torch.equal(seen[1], torch.zeros(1, 3))
        assert not model_logprobs(type("Bare", (), {})())
    finally:
        module.get_logprobs = original
