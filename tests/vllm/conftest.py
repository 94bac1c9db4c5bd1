"""The vLLM stage (``scripts/test-vllm.sh``): runs in ``.venv-vllm`` beside a real vLLM.

The main test run does not collect this directory (``--ignore=tests/vllm`` in pyproject's
addopts); here every test must run: a skip fails the stage.
"""

from __future__ import annotations

import pytest


def pytest_sessionstart(session):
    import importlib.metadata

    from xinf_llama_vision.engines.vllm import installed_vllm, supports_mllama

    found = installed_vllm()
    if found is None or not supports_mllama(found[1]):
        raise pytest.UsageError(f"the vLLM stage needs vLLM >= 0.6.3, <= 0.10.2 installed; found {found}")
    print(f"vLLM stage: {found[0]} {found[1]}, xinference {importlib.metadata.version('xinference')}")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line(f"vLLM stage: {len(skipped)} test(s) skipped; every test must run here", red=True)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """:class:`oracle.Reference` on this venv's transformers 4.x (``torch_dtype``, not 5.x's ``dtype``)."""
    import torch
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from oracle import TEMPLATE, Reference

    class Reference4(Reference):
        def __init__(self, path: str):
            self.processor = AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer
            self.model = MllamaForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
            self.template = TEMPLATE.read_text()

    return Reference4(tiny_checkpoint)
