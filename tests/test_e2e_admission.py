"""Admission by memory through a real ``xinference-local`` (issue 21, item 3): a model launched with a
small ``--kv_cache_memory`` serves a flood of image requests with long answers within it (the peak
its batch measured on its own tensors, in the server's log), every answer raw transformers' own; the
context it serves is the one the budget holds; launches the budget cannot serve fail, saying why.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from load import check, expected_answers, run
from xinf_llama_vision.engines.transformers.admission import Budget
from xinf_llama_vision.memory import Architecture, image_tokens

FLOOD = ["image, streamed", "two images, streamed", "wide image, stop string", "text only"]
LONG = {name: 96 for name in FLOOD}
MAX_IMAGES = 2
FLOAT32 = 4  # the CPU's dtype


def budget(tiny_checkpoint) -> Budget:
    """About two rows of 80 tokens (answers grow to 96 and more) with two images each, under the rule (half the budget for two or
    more rows): a flood of 24 needs more."""
    b = Budget.of(Architecture.from_checkpoint(tiny_checkpoint), FLOAT32, 0)
    arch = Architecture.from_checkpoint(tiny_checkpoint)
    b.limit = 2 * b.need(2, 80, image_tokens(arch, MAX_IMAGES))
    return b


@pytest.fixture(scope="module")
def small(server, tiny_checkpoint):
    limit = budget(tiny_checkpoint).limit
    uid = server.launch("llama-3.2-vision-instruct", "admission", tiny_checkpoint, "--disable-virtual-env",
                        "--max_images", str(MAX_IMAGES), "--kv_cache_memory", f"{limit}")
    yield uid, limit
    server.cli("terminate", "--model-uid", uid, check=False)


def peaks(server, limit: int, since: int = 0):
    """``[(peak, budget, rows put back)]`` of the batch cache's reports in the server's log after its
    first ``since`` characters, of the model whose budget is ``limit`` (the server runs other models)."""
    found = re.findall(r"batch cache: peak (\d+) bytes of a budget of (\d+) bytes; (\d+) rows put back",
                       server.log.read_text(errors="replace")[since:])
    return [r for r in (tuple(map(int, f)) for f in found) if r[1] == limit]


def test_a_flood_stays_within_a_small_budget_and_every_answer_is_exact(server, small, reference):
    uid, limit = small
    expected = expected_answers(reference, max_tokens=LONG)
    since = len(server.log.read_text(errors="replace"))
    names = FLOOD * 6
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda i: run(server, uid, names[i], expected[names[i]].options, i % 2 == 0),
                                range(len(names))))
    check(results, expected)
    import time

    deadline = time.time() + 30
    while not peaks(server, limit, since) and time.time() < deadline:  # reported once the model is idle for a second
        time.sleep(0.5)
    reports = peaks(server, limit, since)
    assert reports
    assert max(peak for peak, _, _ in reports) <= limit
    assert sum(back for _, _, back in reports) > 0  # the budget, not max_num_seqs, was what held the batch


def test_the_context_is_the_one_the_budget_holds(server, small, tiny_checkpoint):
    """A row alone may fill the budget: the context is what one row with the most images holds, and
    a request beyond it gets a 400 naming it."""
    uid, limit = small
    arch = Architecture.from_checkpoint(tiny_checkpoint)
    holds = (limit - image_tokens(arch, MAX_IMAGES) * Budget.of(arch, FLOAT32, 0).per_image_token) // \
        Budget.of(arch, FLOAT32, 0).per_token
    assert holds < 4096  # the checkpoint's
    body = {"model": uid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": holds}
    status, reply = server.post("/v1/chat/completions", body)
    assert status == 400 and f"context length of {holds} tokens" in str(reply), reply
    assert f"context {holds} tokens" in server.log.read_text(errors="replace")


@pytest.mark.parametrize("options, words", [
    (["--context_length", "4096"], "launch with --context_length {holds} or less"),
    (["--kv_cache_memory", "lots"], "launch option kv_cache_memory must be a size such as 8GiB"),
])
def test_a_launch_the_budget_cannot_serve_fails_saying_why(server, tiny_checkpoint, options, words):
    b = budget(tiny_checkpoint)
    arch = Architecture.from_checkpoint(tiny_checkpoint)
    holds = b.context(image_tokens(arch, MAX_IMAGES))
    extra = ["--kv_cache_memory", str(b.limit)] if "--kv_cache_memory" not in options else []
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "transformers",
                        "--model_path", tiny_checkpoint, "--model-uid", "admission-refused", "--disable-virtual-env",
                        "--max_images", str(MAX_IMAGES), *extra, *options, check=False)
    server.cli("terminate", "--model-uid", "admission-refused", check=False)
    assert result.returncode != 0
    assert words.format(holds=holds) in result.stdout + result.stderr, result.stderr[-2000:]
