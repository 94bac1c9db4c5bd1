"""Xinference's REST routes and their answers (``RESTfulAPI``'s router, Xinference 4.x): the plugin's
checks (:mod:`xinf_llama_vision.api`) run inside the routes they guard and see what goes back.

For: xinference >= 4.0, < 5 (measured on 4.1.0: FastAPI 0.136, Starlette 1.10, sse-starlette 3.7);
``tests/test_compat_xinference.py`` fails when what this relies on changes. Xinference's
``configure_api`` hands an extension the router before the app mounts it, but has no hook inside a
route, after its middleware and the route's authentication: a middleware runs before both, and a
dependency cannot replace the body the endpoint reads (docs/security.md). Two patches, on objects of
this API process, never on Xinference's classes:

* :func:`wrap_endpoint`: a hook in place of one route's endpoint function. Relies on the chat,
  completion and launch routes being FastAPI ``APIRoute`` objects whose endpoint takes ``request``.
* :func:`wrap_send`: an answer's ASGI messages through a wrapper. Xinference's route class
  (``ModelRequestLoggingRoute``) tells streams from whole answers by the answer's type and hooks its
  logging and disconnect handling onto that object, so the answer stays the same object; only its
  ``__class__`` becomes a subclass of the same name that wraps ``send``.
* :func:`keep_alive`: a stream's keep-alive interval. Xinference's streams are sse-starlette's
  ``EventSourceResponse`` with ``ping`` = ``XINFERENCE_SSE_PING_ATTEMPTS_SECONDS`` (600 s by default);
  its ``ping_interval`` setter changes one answer's interval before it starts.
"""

from __future__ import annotations

import functools
from typing import Dict

_WATCHED: Dict[type, type] = {}


def wrap_endpoint(route, hook) -> None:
    """Run ``hook(path, endpoint, args, kwargs)`` in place of ``route``'s endpoint (same signature, so
    FastAPI resolves the same parameters and runs the route's dependencies first)."""
    endpoint = route.endpoint

    @functools.wraps(endpoint)
    async def guarded(*args, **kwargs):
        return await hook(route.path, endpoint, args, kwargs)

    route.endpoint = guarded  # what include_router copies
    route.dependant.call = guarded  # a route already built into an app


def wrap_send(response, wrap):
    """``response``, sending through ``wrap(send)`` (same class to Xinference's route code, which
    logs streams by their type: a subclass that only wraps ``send``); an answer already wrapped
    keeps its first ``wrap``."""
    cls = type(response)
    if not hasattr(response, "__call__") or cls.__module__ == __name__:
        return response
    if cls not in _WATCHED:
        async def call(self, scope, receive, send):
            await cls.__call__(self, scope, receive, self._xlv_wrap(send))

        _WATCHED[cls] = type(cls.__name__, (cls,), {"__call__": call, "__module__": __name__})
    response.__class__ = _WATCHED[cls]
    response._xlv_wrap = wrap
    return response


def keep_alive(response, seconds: float) -> None:
    """Keep-alive comments on ``response`` (a stream) at least every ``seconds``; an interval already
    shorter, or 0 (the operator turned them off), stays."""
    current = getattr(response, "ping_interval", None)
    if isinstance(current, (int, float)) and current > seconds:
        response.ping_interval = seconds
