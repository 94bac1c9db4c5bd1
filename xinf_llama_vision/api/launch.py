"""Launches of our families, checked inside Xinference's launch route ``POST /v1/models``
(:class:`LaunchGuard`): an engine that cannot run the family or its variant here is refused with its
reason, and an engine whose model process needs environment variables gets them in the launch."""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable, Dict, Optional

from ..errors import RequestError
from .asgi import replay
from .refusal import error_response

logger = logging.getLogger("xinf_llama_vision")


class LaunchGuard:
    """The checks the wrapped launch endpoint runs for our families (see the module's docstring)."""

    def __init__(self, get_supervisor_ref: Callable[[], Awaitable[Any]]):
        self.get_supervisor_ref = get_supervisor_ref

    async def launch(self, path: str, endpoint, args, kwargs):
        """A launch, after Xinference's ``models:write`` check."""
        from starlette.requests import Request

        request = kwargs["request"]
        try:
            checked = await self._check_launch(await request.body())
        except RequestError as e:
            logger.info("refused a launch: %s", e)
            return error_response(400, str(e))
        if checked is not None:
            kwargs["request"] = Request(request.scope, replay(json.dumps(checked).encode(), request.receive))
        return await endpoint(*args, **kwargs)

    async def _check_launch(self, raw: bytes) -> Optional[Dict[str, Any]]:
        """A launch of one of our families: on an engine that cannot run it here, say why; on an
        engine whose model process needs environment variables (``ENGINE_ENVS``), add them to the
        launch's ``envs``, which Xinference sets in the model process before anything is imported.

        Xinference's own launch error only says "cannot be run on engine vLLM"; the reason our
        engine class gave (shown in the engine listing, merged over the workers) goes with it.
        """
        from ..catalog import ENGINE_ENVS, our_families

        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("model_name") not in our_families():
            return None
        name, engine = data["model_name"], data.get("model_engine")
        if not isinstance(engine, str):
            return None
        try:
            supervisor = await self.get_supervisor_ref()
            engines = await supervisor.query_engines_by_model_name(
                name, model_type="LLM", enable_virtual_env=data.get("enable_virtual_env")
            )
        except Exception:  # Xinference's handler answers for itself
            return None
        for key, value in (engines or {}).items():
            if key.lower() != engine.lower():
                continue
            if isinstance(value, str):
                raise RequestError(f"Model {name} cannot be run on engine {key}: {value}")
            why = self._variant_refusal(key, data, value)
            if why:
                raise RequestError(f"Model {name} cannot be run on engine {key}: {why}")
        needed = ENGINE_ENVS.get(engine.lower())
        if not needed:
            return None
        given = data.get("envs") if isinstance(data.get("envs"), dict) else {}
        return {**data, "envs": {**given, **needed}}

    @staticmethod
    def _variant_refusal(engine: str, data: Dict[str, Any], listed: Any) -> Optional[str]:
        """Why ``engine`` does not serve the launch's format and quantization (:mod:`.quantization`),
        or what the variant needs that no worker has (it is missing from the engine's listing)."""
        from ..quantization import NEEDS, refusal

        fmt, quantization = data.get("model_format"), data.get("quantization")
        if not isinstance(fmt, str) or not isinstance(quantization, str):
            return None
        why = refusal(engine.lower(), fmt, quantization)
        if why or not isinstance(listed, list):
            return why
        offered = any(isinstance(p, dict) and p.get("model_format") == fmt and quantization in (p.get("quantizations") or [])
                      for p in listed)
        return None if offered else NEEDS.get(fmt)
