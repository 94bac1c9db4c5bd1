"""The spec files and their schema: what ships is valid, and broken files say where they are broken."""

from __future__ import annotations

import pytest
import yaml

from xinf_llama_vision.schema import SpecError, load_families, parse_family, spec_dir


def test_shipped_specs_declare_both_families():
    families = {f.model_name: f for f in load_families()}
    assert set(families) == {"llama-3.2-vision", "llama-3.2-vision-instruct"}
    base, instruct = families["llama-3.2-vision"], families["llama-3.2-vision-instruct"]
    assert base.kind == "base" and set(base.abilities) >= {"generate", "vision"} and "chat" not in base.abilities
    assert instruct.kind == "instruct" and set(instruct.abilities) >= {"chat", "vision"}
    for family in families.values():
        assert family.context_length == 131072
        assert family.languages == ["en", "de", "fr", "it", "pt", "hi", "es", "th"]
        assert family.architectures == ["MllamaForConditionalGeneration"]
        assert family.stop == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
        assert family.stop_token_ids == [128001, 128008, 128009]
        pytorch = [s for s in family.specs if s.model_format == "pytorch"]
        assert [s.model_size_in_billions for s in pytorch] == [11, 90]
        assert all(s.quantizations == ["none", "8-bit", "4-bit"] for s in pytorch)


def test_repository_ids_follow_meta_naming():
    ids = {f.model_name: [s.hubs["huggingface"] for s in f.specs if s.model_format == "pytorch"] for f in load_families()}
    assert ids["llama-3.2-vision"] == ["meta-llama/Llama-3.2-11B-Vision", "meta-llama/Llama-3.2-90B-Vision"]
    assert ids["llama-3.2-vision-instruct"] == [
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "meta-llama/Llama-3.2-90B-Vision-Instruct",
    ]


def test_stop_token_ids_match_the_real_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from tiny import tokenizer_dir

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())
    for family in load_families():
        assert [tokenizer.convert_tokens_to_ids(t) for t in family.stop] == family.stop_token_ids


def _valid() -> dict:
    return yaml.safe_load((spec_dir() / "llama-3.2-vision-instruct.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["specs"][0].update(model_size_in_billions="eleven"), "specs.0.model_size_in_billions: Input should be a valid integer"),
        (lambda d: d.update(kind="chatty"), "kind: Input tag 'chatty'"),
        (lambda d: d.pop("context_length"), "context_length: Field required"),
        (lambda d: d.update(abilities=["generate", "vision"]), "abilities: Value error, an instruct family has the 'chat' ability"),
        (lambda d: d["specs"][0]["hubs"].pop("huggingface"), "specs.0.hubs: Value error, a 'huggingface' repository id is required"),
        (lambda d: d["stop_tokens"][0].update(id=-1), "stop_tokens.0.id: Input should be greater than or equal to 0"),
        (lambda d: d.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (lambda d: d.pop("tool_parser"), "the 'tools' ability and tool_parser go together"),
        (lambda d: d.update(tool_parser="qwen"), "tool_parser: Input should be 'llama3'"),
        (lambda d: d["specs"].append(dict(d["specs"][0])), "duplicate model_format and model_size_in_billions"),
    ],
)
def test_broken_spec_names_file_and_field(mutate, message):
    data = _valid()
    mutate(data)
    with pytest.raises(SpecError) as error:
        parse_family(yaml.safe_dump(data), "model_specs/broken.yaml")
    assert str(error.value).startswith("model_specs/broken.yaml: ")
    assert message in str(error.value)


def test_broken_file_in_a_directory_is_named(tmp_path):
    (tmp_path / "good.yaml").write_text((spec_dir() / "llama-3.2-vision.yaml").read_text())
    (tmp_path / "bad.yaml").write_text("model_name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_families(tmp_path)


def test_specs_become_xinference_families():
    from xinf_llama_vision.registration import to_xinference

    for family in load_families():
        xf = to_xinference(family)
        assert xf.model_name == family.model_name
        assert xf.stop_token_ids == family.stop_token_ids
        hubs = {(s.model_format, s.model_size_in_billions, s.quantization, s.model_hub): s.model_id
                for s in xf.model_specs}
        for spec in family.specs:
            for hub, repo in spec.hubs.items():
                for quantization in spec.quantizations:
                    assert hubs[(spec.model_format, spec.model_size_in_billions, quantization, hub)] == repo


def test_vllm_defaults_per_size():
    for family in load_families():
        by_size = {s.model_size_in_billions: s.vllm for s in family.specs if s.model_format == "pytorch"}
        assert by_size[11].max_num_seqs == 16 and by_size[11].tensor_parallel_size is None
        assert by_size[90].max_num_seqs == 32 and by_size[90].tensor_parallel_size == 8
        for defaults in by_size.values():
            assert defaults.enforce_eager is True and defaults.max_model_len == 8192
        assert any(p.startswith("vllm==0.10.2 ;") for p in family.virtualenv_packages)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["specs"][0]["vllm"].update(max_num_seqs=0), "specs.0.vllm.max_num_seqs: Input should be greater than 0"),
        (lambda d: d["specs"][1]["vllm"].update(tensor_parallel_size=3), "specs.1.vllm.tensor_parallel_size: Input should be 1, 2, 4 or 8"),
        (lambda d: d["specs"][0]["vllm"].update(gpu_memory_utilization=1.5), "specs.0.vllm.gpu_memory_utilization: Input should be less than or equal to 1"),
        (lambda d: d["specs"][0]["vllm"].update(max_model_len=200000), "11B vllm.max_model_len 200000 exceeds context_length 131072"),
        (lambda d: d["specs"][0]["vllm"].update(swap=4), "specs.0.vllm.swap: Extra inputs are not permitted"),
        (lambda d: d.update(virtualenv_packages=['vllm>=0.11 ; #engine# == "vllm"']), "pin one vLLM release that runs Mllama (>= 0.6.3, <= 0.10.2)"),
        (lambda d: d.update(virtualenv_packages=['vllm==0.11.0 ; #engine# == "vllm"']), "pin one vLLM release that runs Mllama"),
    ],
)
def test_broken_vllm_fields_name_the_field(mutate, message):
    data = _valid()
    mutate(data)
    with pytest.raises(SpecError) as error:
        parse_family(yaml.safe_dump(data), "model_specs/broken.yaml")
    assert message in str(error.value)


def test_prequantized_repositories():
    """Ids checked against their model pages (unsloth's nf4 list; Neural Magic's FP8-dynamic cards)."""
    ids = {f.model_name: {(s.model_format, s.model_size_in_billions): (s.quantizations, s.hubs["huggingface"])
                          for s in f.specs if s.model_format != "pytorch"} for f in load_families()}
    assert ids["llama-3.2-vision"] == {
        ("bnb", 11): (["4-bit"], "unsloth/Llama-3.2-11B-Vision-bnb-4bit"),
        ("bnb", 90): (["4-bit"], "unsloth/Llama-3.2-90B-Vision-bnb-4bit"),
    }
    assert ids["llama-3.2-vision-instruct"] == {
        ("bnb", 11): (["4-bit"], "unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit"),
        ("bnb", 90): (["4-bit"], "unsloth/Llama-3.2-90B-Vision-Instruct-bnb-4bit"),
        ("fp8", 11): (["FP8"], "neuralmagic/Llama-3.2-11B-Vision-Instruct-FP8-dynamic"),
        ("fp8", 90): (["FP8"], "neuralmagic/Llama-3.2-90B-Vision-Instruct-FP8-dynamic"),
    }


def test_a_format_offers_only_its_quantizations():
    text = (spec_dir() / "llama-3.2-vision.yaml").read_text().replace("quantizations: [4-bit]", "quantizations: [8-bit]", 1)
    with pytest.raises(SpecError, match=r"bnb weights come in quantizations \['4-bit'\], not \['8-bit'\]"):
        parse_family(text, "x.yaml")


def test_pyproject_declares_the_transformers_the_engine_serves_with():
    """The declared requirement (main and vllm extra) is TRANSFORMERS_VERSIONS, whose minimum the 4.x stage runs at."""
    import pathlib
    import re
    import tomllib

    from packaging.requirements import Requirement

    from xinf_llama_vision.schema import TRANSFORMERS_MIN, TRANSFORMERS_VERSIONS

    root = pathlib.Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["vllm"]
    declared = [Requirement(line).specifier for line in lines if Requirement(line).name == "transformers"]
    assert len(declared) == 2
    for specifier in declared:
        assert set(TRANSFORMERS_VERSIONS) <= set(specifier), specifier
    stage = re.search(r"transformers==([\d.]+)", (root / "scripts" / "setup-vllm.sh").read_text()).group(1)
    assert stage == TRANSFORMERS_MIN
