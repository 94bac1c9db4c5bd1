"""Load is part of correctness: dozens of concurrent requests to one model through a real
``xinference-local`` over HTTP, streaming and not, images and text-only, clients that hang up.
Every answer that is read to the end equals unbatched raw transformers (greedy); nothing hangs;
abandoned answers leave the batch; memory does not grow from one round to the next.
"""

from __future__ import annotations

import re
import time

import pytest

from load import CASES, check, expected_answers, load_round, run


def processes(server):
    """MiB of RSS per process of the server's tree (for the message of a failed memory check)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    return {f"{p.pid} {' '.join(p.cmdline())[:60]}": p.memory_info().rss >> 20
            for p in [root, *root.children(recursive=True)]}


@pytest.fixture(scope="module")
def chat_uid(launched):
    """Two images per request allowed (Meta recommends one; the default is 1)."""
    return launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--max_images", "2")


@pytest.fixture(scope="module")
def expected(reference):
    return expected_answers(reference)


def test_32_concurrent_mixed_requests_equal_raw_transformers(server, chat_uid, expected):
    run(server, chat_uid, "text only", expected["text only"].options)  # warm: the baseline is a served model
    time.sleep(2)  # past the scheduler's idle second, when it gives freed memory back
    baseline, processes_before = server.rss(), processes(server)
    for round_ in range(2):
        results = load_round(server, chat_uid, expected, list(CASES))
        assert len(results) == 32
        check(results, expected)
        if round_ == 0:
            after_first = server.rss()
    # The same load again holds no more memory than the first time (no leak per request).
    assert server.rss() <= after_first + 64 * 2**20
    # The model still answers on its own afterwards.
    assert run(server, chat_uid, "text only", expected["text only"].options)[1] == expected["text only"].text
    # At rest, the memory the load took goes back to the system, but for what Python and the C
    # allocator keep (measured: ~36 MiB in the model process, ~7 MiB in the API process).
    deadline = time.time() + 30
    while server.rss() > baseline + 64 * 2**20 and time.time() < deadline:
        time.sleep(1)
    assert server.rss() <= baseline + 64 * 2**20, (baseline, server.rss(), processes_before, processes(server))


def test_clients_that_hang_up_leave_the_batch(server, launched, expected):
    """With one row (``--max_num_seqs 1``) a stream that would run 2000 tokens is abandoned after its
    first chunk: the model says so in its log, and the next request gets the slot and its answer."""
    uid = launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--max_num_seqs", "1")
    left = re.compile(r"a request left the batch after (\d+) of 2000 tokens: the client went away")
    before = len(left.findall(server.log.read_text()))
    run(server, uid, "hang-up")
    assert run(server, uid, "text only", expected["text only"].options)[1] == expected["text only"].text
    deadline = time.time() + 30
    while len(left.findall(server.log.read_text())) == before and time.time() < deadline:
        time.sleep(0.5)
    found = left.findall(server.log.read_text())
    assert len(found) == before + 1
    assert int(found[-1]) < 2000


def test_a_bad_launch_option_for_max_num_seqs_fails_the_launch(server, tiny_checkpoint):
    result = server.cli("launch", "--model-name", "llama-3.2-vision-instruct", "--model-engine", "transformers",
                        "--model_path", tiny_checkpoint, "--model-uid", "bad-max-num-seqs",
                        "--disable-virtual-env", "--max_num_seqs", "0", check=False)
    assert result.returncode != 0
    assert "launch option max_num_seqs must be an integer >= 1, got 0" in result.stdout + result.stderr
