"""Property-based fuzzing: generated request structures against the adapter and the running server.

* The adapter (``validation.check_chat`` / ``check_completion`` with random policies, and
  ``messages.build_chat_prompt``): every input either succeeds or raises ``RequestError``; any
  other exception is a bug.
* The server (real ``xinference-local``, raw HTTP): every answer is a 200 or a 4xx, a streamed
  200 never carries an error event, and afterwards the model still gives the baseline answer
  from the same (never restarted) process.

The counts (outcome histograms) are printed in the terminal summary, with or without ``-s``.
"""

from __future__ import annotations

import collections
import json
import os

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz_strategies import (
    GOOD_IMAGE,
    chat_bodies,
    completion_bodies,
    huge_chat_bodies,
    message_lists,
    tools,
)
from xinf_llama_vision import images
from xinf_llama_vision.messages import RequestError, build_chat_prompt
from xinf_llama_vision.validation import Policy, check_chat, check_completion

#: Examples per adapter property (thousands in all); XLV_FUZZ_SCALE multiplies them.
SCALE = float(os.environ.get("XLV_FUZZ_SCALE", "1"))
ADAPTER_EXAMPLES = int(1200 * SCALE)
SERVER_EXAMPLES = int(150 * SCALE)  # per endpoint

FUZZ = settings(deadline=None, database=None, derandomize=False, print_blob=True,
                suppress_health_check=list(HealthCheck))


def report(config, title: str, counts: collections.Counter) -> None:
    """Hand a histogram to the terminal summary (conftest's ``pytest_terminal_summary``) and print it."""
    line = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
    config.xlv_fuzz_reports = getattr(config, "xlv_fuzz_reports", []) + [(title, sum(counts.values()), line)]
    print(f"\n{title}: {sum(counts.values())} cases; {line}")


@pytest.fixture(scope="module")
def no_network():
    """Safety net: the loader may not resolve names or open sockets during the adapter fuzz
    (the strategies only name literal private addresses, which are refused before connecting)."""
    saved = images._resolve, images._open_socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"the fuzz tried to reach the network: {args}")

    images._resolve = images._open_socket = refuse
    yield
    images._resolve, images._open_socket = saved


policies = st.builds(Policy, kind=st.sampled_from(["instruct"] * 4 + ["base"]), max_images=st.integers(1, 3))


def _outcome(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except RequestError as e:
        assert str(e).strip(), "a refusal must say why"
        return "RequestError"
    return "ok"


def test_adapter_check_chat(no_network, pytestconfig):
    counts = collections.Counter()

    @settings(FUZZ, max_examples=ADAPTER_EXAMPLES)
    @given(body=st.one_of(chat_bodies(), chat_bodies(), huge_chat_bodies(), st.none(), st.integers(), st.text()),
           policy=policies)
    # What this fuzzer found (fixed): non-finite numbers, an image in a tool-calling assistant turn.
    @example(body={"max_tokens": float("inf"), "messages": []}, policy=Policy("instruct"))
    @example(body={"temperature": float("nan"), "messages": [{"role": "user", "content": "hi"}]}, policy=Policy("instruct"))
    @example(body={"max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD_IMAGE}}]},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
         "content": [{"type": "image_url", "image_url": {"url": GOOD_IMAGE}}]},
        {"role": "tool", "content": "x"}]}, policy=Policy("instruct", max_images=2))
    def check(body, policy):
        counts[_outcome(check_chat, body, policy)] += 1

    check()
    report(pytestconfig, "fuzz adapter check_chat", counts)
    assert counts["ok"] and counts["RequestError"]


def test_adapter_check_completion(no_network, pytestconfig):
    counts = collections.Counter()

    @settings(FUZZ, max_examples=ADAPTER_EXAMPLES)
    @given(body=st.one_of(completion_bodies(), st.none(), st.lists(st.integers())), policy=policies)
    def check(body, policy):
        counts[_outcome(check_completion, body, policy)] += 1

    check()
    report(pytestconfig, "fuzz adapter check_completion", counts)
    assert counts["ok"] and counts["RequestError"]


def test_adapter_build_chat_prompt(pytestconfig):
    counts = collections.Counter()

    @settings(FUZZ, max_examples=ADAPTER_EXAMPLES)
    @given(messages=message_lists, tools=tools, max_images=st.integers(0, 3),
           date_string=st.one_of(st.none(), st.text(max_size=20)), in_user=st.booleans())
    def check(messages, tools, max_images, date_string, in_user):
        counts[_outcome(build_chat_prompt, messages, tools=tools, max_images=max_images, date_string=date_string,
                        tools_in_user_message=in_user)] += 1

    check()
    report(pytestconfig, "fuzz adapter build_chat_prompt", counts)
    assert counts["ok"] and counts["RequestError"]
