"""The REST side (runs in Xinference's API process, through ``configure_api``)."""

from __future__ import annotations

from .extension import STATUS_PATH


def install(context) -> None:
    from .registration import status

    @context.app.get(STATUS_PATH, include_in_schema=False)
    async def xinf_llama_vision_status():
        return status()
