"""End to end on the Transformers engine: real ``xinference-local``, real ``xinference launch``,
real HTTP, against raw transformers (the tests are in :mod:`parity`), with Xinference's per-model
virtualenv mode on (its default) and off.
"""

from __future__ import annotations

import pytest

from parity import *  # noqa: F401,F403 - the shared parity tests, collected here

VENV = {"virtualenv on": (), "virtualenv off": ("--disable-virtual-env",)}


@pytest.fixture(scope="module", params=VENV)
def venv(request):
    return VENV[request.param]


@pytest.fixture(scope="module")
def chat_uid(launched, venv):
    return launched("llama-3.2-vision-instruct", *venv)


@pytest.fixture(scope="module")
def base_uid(launched, venv):
    return launched("llama-3.2-vision", *venv)
