"""The host internals our patches (``xinf_llama_vision/compat/``) rely on are still there, in the shape
they were written for: each test fails when the installed Xinference or transformers changes under
a patch (the vLLM ones: tests/vllm/test_compat_v0.py, tests/vllm_v1/test_compat_v1.py)."""

import inspect

import pytest

from xinf_llama_vision.catalog import our_families
from xinf_llama_vision.registration import to_xinference


def test_transformers_generation_internals_take_what_the_scheduler_passes():
    from transformers import GenerationMixin

    prepare = inspect.signature(GenerationMixin._prepare_generation_config).parameters
    assert "generation_config" in prepare and any(p.kind is p.VAR_KEYWORD for p in prepare.values())
    processors = inspect.signature(GenerationMixin._get_logits_processor).parameters
    for name in ("generation_config", "input_ids_seq_length", "encoder_input_ids", "prefix_allowed_tokens_fn",
                 "logits_processor", "device", "model_kwargs"):
        assert name in processors, name


def test_the_sampler_builds_generates_processors(tiny_checkpoint):
    """Behaviour, not only names: a request's options become the warpers ``generate`` would use."""
    import torch
    from transformers import MllamaForConditionalGeneration

    from xinf_llama_vision.compat.transformers_generation import sampler

    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processors, do_sample = sampler(model, {"do_sample": True, "temperature": 0.5, "top_k": 3},
                                    torch.tensor([[1, 2, 3]]))
    assert do_sample
    names = [type(p).__name__ for p in processors]
    assert "TemperatureLogitsWarper" in names and "TopKLogitsWarper" in names, names
    processors, do_sample = sampler(model, {"do_sample": False}, torch.tensor([[1, 2, 3]]))
    assert not do_sample


@pytest.mark.parametrize("name", sorted(our_families()))
def test_the_download_wrapper_reads_attributes_xinference_sets(name):
    from xinference.model.llm.cache_manager import LLMCacheManager

    family = to_xinference(our_families()[name])
    family.model_specs = family.model_specs[:1]
    manager = LLMCacheManager(family)
    for attribute in ("_llm_family", "_model_name", "_model_uri", "_model_id", "_model_hub", "_use_draft_model"):
        assert hasattr(manager, attribute), attribute
    assert list(inspect.signature(LLMCacheManager.cache).parameters) == ["self"]


def test_the_catalog_refresh_is_a_function_of_no_arguments():
    import xinference.model.llm as llm

    from xinf_llama_vision.compat import xinference_refresh

    refresh = xinference_refresh._original or llm.register_builtin_model
    assert callable(refresh) and not inspect.signature(refresh).parameters
