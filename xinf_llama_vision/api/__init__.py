"""The REST side, installed in Xinference's API process through ``configure_api`` (:func:`install`).

The plugin adds nothing in front of Xinference's own security. Its checks run **inside** the
routes they guard, as a wrapper of each route's endpoint (``/v1/chat/completions``,
``/v1/completions`` and the launch route ``POST /v1/models``): by the time a wrapper runs,
Xinference's middleware (IP allow-list, CORS, request ids, audit) and the route's own
authentication dependency (with its permission, and its count of failed tokens toward the IP
ban) have passed the request, and every answer of the wrapper leaves through the same stack.

* :mod:`.guard`: chat and completion requests for our models, checked before Xinference's handler.
* :mod:`.launch`: launches of our families on an engine that cannot run them get the engine's reason.
* :mod:`.refusal`: what the model process refuses (an image it cannot fetch or decode, a prompt
  that does not fit the context) is a 400 too, streaming included.
* :mod:`.asgi`: the ASGI plumbing they share.
* ``GET /v1/xinf-llama-vision/status``: what the plugin registered, behind the same credential
  as Xinference's ``GET /v1/cluster/version``.

How the wrappers get into Xinference's routes and answers: :mod:`xinf_llama_vision.compat.xinference_api`.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from ..compat.xinference_api import wrap_endpoint
from ..request import CHECKS
from .guard import MAX_BODY_BYTES, POLICY_SECONDS, Guard
from .launch import LaunchGuard

__all__ = ["LAUNCH_PATH", "MAX_BODY_BYTES", "POLICY_SECONDS", "STATUS_PATH", "install"]

logger = logging.getLogger("xinf_llama_vision")

#: What the plugin registered in this API process (``doctor`` reads it).
STATUS_PATH = "/v1/xinf-llama-vision/status"
#: Xinference's launch route (``xinference launch`` posts here).
LAUNCH_PATH = "/v1/models"


def install(context) -> None:
    """``configure_api``: the status route, and the guard around the routes it checks."""
    from fastapi.routing import APIRoute

    from ..registration import status

    routes = [r for r in context.router.routes if isinstance(r, APIRoute)]
    version = next((r for r in routes if r.path == "/v1/cluster/version"), None)

    async def xinf_llama_vision_status() -> JSONResponse:
        return JSONResponse(status())

    context.router.add_api_route(STATUS_PATH, xinf_llama_vision_status, methods=["GET"], include_in_schema=False,
                                 dependencies=list(version.dependencies) if version is not None else None)
    guard, launches = Guard(context.get_supervisor_ref), LaunchGuard(context.get_supervisor_ref)
    wrapped = []
    for route in routes:
        if "POST" in route.methods and route.path in CHECKS:
            wrap_endpoint(route, guard.request)
            wrapped.append(route.path)
        elif "POST" in route.methods and route.path == LAUNCH_PATH:
            wrap_endpoint(route, launches.launch)
            wrapped.append(route.path)
    if len(wrapped) != len(CHECKS) + 1:
        logger.warning("xinf-llama-vision: request checks installed on %s only (this Xinference's routes differ)",
                       wrapped)
