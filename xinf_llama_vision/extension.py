"""Activation through Xinference's official extension point.

Set ``XINFERENCE_EXTENSIONS=xinf_llama_vision.extension:create`` for every Xinference process
(``xinference-local``, ``-supervisor``, ``-worker``); Xinference loads the factory in each API
and actor process, spawned ones included. The factory registers our families and engines in
that process and logs one line that says so. ``configure_api`` adds the status route and the
request checks that answer user mistakes with HTTP 400 before they reach the model.
"""

from __future__ import annotations

import logging

from ._version import __version__

logger = logging.getLogger("xinf_llama_vision")

ENTRY = "xinf_llama_vision.extension:create"


class Extension:
    name = "xinf-llama-vision"
    api_version = 1

    def configure_api(self, context) -> None:
        from .api import install

        install(context)

    def worker_metadata(self):
        return {"version": __version__}

    def filter_worker_resources(self, worker, workers):
        return list(worker["gpu_devices"])


def create() -> Extension:
    """The ``XINFERENCE_EXTENSIONS`` factory: register in this process, then hand Xinference the hooks."""
    from .registration import register, status

    register()
    info = status()
    logger.warning(
        "xinf-llama-vision %s active in this process: %s",
        __version__,
        ", ".join(f"{name} -> {', '.join(c.rsplit(':', 1)[1] for c in classes)}" for name, classes in info.get("families", {}).items()),
    )
    return Extension()
