"""Activation: cheap import, Xinference's real extension loading path, precedence, undo, and ``doctor``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import BIN, EXTENSION, Server, base_env, free_port


def test_import_loads_nothing_heavy():
    code = (
        "import sys, xinf_llama_vision, xinf_llama_vision.extension; "
        "print(sorted(m for m in ('xinference', 'torch', 'transformers', 'PIL', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def base_id(llm):
    family = next(f for f in llm.BUILTIN_LLM_FAMILIES if f.model_name == "llama-3.2-vision")
    return next(s.model_id for s in family.model_specs if s.model_hub == "huggingface")


def instruct(llm):
    return next(f for f in llm.BUILTIN_LLM_FAMILIES if f.model_name == "llama-3.2-vision-instruct")


def test_extension_factory_registers_ahead_of_builtins_and_unregister_undoes_it(monkeypatch):
    """Through Xinference's own loader (``XINFERENCE_EXTENSIONS``), in this process."""
    import xinference.extensions as extensions

    import xinf_llama_vision
    from xinf_llama_vision.engines.transformers import MllamaChatModel, MllamaGenerateModel

    monkeypatch.setenv("XINFERENCE_EXTENSIONS", EXTENSION)
    monkeypatch.setattr(extensions, "_loaded", None)
    try:
        (extension,) = extensions.get_extensions()
        assert extension.name == "xinf-llama-vision"
        import xinference.model.llm as llm

        for name, cls in (("llama-3.2-vision-instruct", MllamaChatModel), ("llama-3.2-vision", MllamaGenerateModel)):
            assert llm.LLM_ENGINES[name]["Transformers"][0]["llm_class"] is cls
        assert base_id(llm) == "meta-llama/Llama-3.2-11B-Vision"  # ours (Xinference's built-in says Meta-Llama-3.2-…)
        assert "tools" in instruct(llm).model_ability
        assert llm.SUPPORTED_ENGINES["Transformers"][:2] == [MllamaChatModel, MllamaGenerateModel]
        xinf_llama_vision.register()  # idempotent
        assert llm.SUPPORTED_ENGINES["Transformers"].count(MllamaChatModel) == 1
    finally:
        xinf_llama_vision.unregister()
        monkeypatch.setattr(extensions, "_loaded", None)
    import xinference.model.llm as llm

    assert MllamaChatModel not in llm.SUPPORTED_ENGINES["Transformers"]
    assert base_id(llm) == "meta-llama/Meta-Llama-3.2-11B-Vision"  # Xinference's own entries are back
    assert "tools" not in instruct(llm).model_ability
    assert all(p["llm_class"] is not MllamaChatModel
               for ps in llm.LLM_ENGINES["llama-3.2-vision-instruct"].values() for p in ps)


def doctor(*args, env=None):
    return subprocess.run([str(BIN / "xinf-llama-vision"), "doctor", *args], capture_output=True, text=True, env=env)


def test_doctor_on_an_enabled_server(server):
    result = doctor("--endpoint", server.endpoint, env=server.env)
    assert result.returncode == 0, result.stdout
    assert "llama-3.2-vision-instruct -> xinf_llama_vision.engines.transformers.engine:MllamaChatModel" in result.stdout


def test_doctor_detects_installed_but_not_enabled(bare_server):
    plain_server = bare_server  # the plugin installed but not enabled
    result = doctor("--endpoint", plain_server.endpoint, env=plain_server.env)
    assert result.returncode == 1
    assert "FAIL not enabled in this shell: export XINFERENCE_EXTENSIONS=xinf_llama_vision.extension:create" in result.stdout
    assert f"FAIL server {plain_server.endpoint}: plugin installed but not enabled there" in result.stdout
