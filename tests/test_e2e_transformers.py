"""End to end on the Transformers engine: real ``xinference-local``, real ``xinference launch``,
real HTTP, against raw transformers (the tests are in :mod:`parity`), with Xinference's per-model
virtualenv mode on (its default) and off.
"""

from __future__ import annotations

import pytest

from parity import *  # noqa: F401,F403 - the shared parity tests, collected here

VENV = {"virtualenv on": ("--enable-virtual-env",), "virtualenv off": ("--disable-virtual-env",)}


@pytest.fixture(scope="module", params=VENV)
def venv(request):
    return VENV[request.param]


@pytest.fixture(scope="module")
def chat_uid(launched, venv):
    return launched("llama-3.2-vision-instruct", *venv)


@pytest.fixture(scope="module")
def base_uid(launched, venv):
    return launched("llama-3.2-vision", *venv)


def test_virtualenv_mode_made_the_model_its_virtualenv(server, launched):
    """The "virtualenv on" launches really used one: Xinference created the family's virtualenv for the
    Transformers engine under ``XINFERENCE_HOME/virtualenv`` (the plugin reaches the model process
    there through the inherited ``XINFERENCE_EXTENSIONS`` and the system site-packages)."""
    from pathlib import Path

    launched("llama-3.2-vision-instruct", *VENV["virtualenv on"])  # the launch the parity tests use
    made = list(Path(server.home, "virtualenv").glob("v4/llama-3.2-vision-instruct/transformers/*/pyvenv.cfg"))
    assert made, sorted(str(p) for p in Path(server.home).glob("virtualenv/**/pyvenv.cfg"))
