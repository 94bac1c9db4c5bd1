"""Every module's doctests run (the examples in the docstrings are part of the documentation)."""

import doctest
import importlib
import pkgutil

import pytest

import xinf_llama_vision

#: Our vLLM model's modules import vLLM (>= 0.32), which this environment does not have: the V1
#: stage runs their doctests (tests/vllm_v1/test_v1_doctests.py).
NEED_VLLM = ("xinf_llama_vision.vllm_model.model", "xinf_llama_vision.vllm_model.processing")
MODULES = sorted(
    info.name for info in pkgutil.walk_packages(xinf_llama_vision.__path__, "xinf_llama_vision.")
    if info.name != "xinf_llama_vision.__main__" and info.name not in NEED_VLLM
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctests failed"


def test_the_pure_modules_have_examples():
    counts = {name: doctest.testmod(importlib.import_module(name)).attempted for name in MODULES}
    for name in ("generation", "request.options", "request.checks", "request.wire", "request.messages", "request.grammar", "engines.transformers.responses",
                 "engines.transformers.penalties"):
        assert counts[f"xinf_llama_vision.{name}"] > 0, name
