"""This plugin's Mllama on vLLM's V1 engine computes Meta's Llama 3.2 Vision: every prompt shape of
:mod:`fidelity` against :class:`meta_reference.MetaMllama` on the structural checkpoint, through
``xinference launch`` (alone and all at once); through ``vllm.LLM`` in test_fidelity_v1_llm.py.

Before the fidelity work, the model answered 7 of the 8 shapes unlike Meta's model (all but text
only): its vision tower handed the projector each listed layer's output, concatenated layer after
layer; a run of adjacent images was seen whole from its first token; text before the first image
attended to the images.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from fidelity import CASES, ask, check, launch_families, meta, structural_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def uid_of(server, vllm_launch, structural_checkpoint):
    yield from launch_families(server, lambda name, uid: vllm_launch(
        name, uid, "--max_images", "2", path=structural_checkpoint), "structural-v1")


@pytest.mark.parametrize("name", CASES)
def test_our_v1_model_answers_as_meta(server, uid_of, meta, name):
    check(ask(server, uid_of, name), meta[name], name)


def test_all_at_once_each_answers_as_meta(server, uid_of, meta):
    jobs = [(name, stream) for name in CASES for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: (job, ask(server, uid_of, *job)), jobs))
    for (name, _), got in answers:
        check(got, meta[name], name)
