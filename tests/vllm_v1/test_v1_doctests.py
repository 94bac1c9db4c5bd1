"""The doctests of our vLLM model's modules, which import vLLM (the main run's environment has none)."""

import doctest
import importlib

import pytest

from test_doctests import NEED_VLLM


@pytest.mark.parametrize("name", NEED_VLLM)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctests failed"
