"""The REST side, installed in Xinference's API process through ``configure_api``.

* ``GET /v1/xinf-llama-vision/status``: what the plugin registered in the API process.
* :class:`RequestGuard`, an ASGI middleware in front of ``/v1/chat/completions``,
  ``/v1/completions`` and the launch route ``/v1/models`` (where it adds the reason an engine
  cannot run our family to Xinference's bare refusal): for a model launched by this plugin it runs :mod:`.validation` before
  Xinference's own handler, answers user mistakes with HTTP 400 (the same for streaming and
  non-streaming requests), and hands the handler the body with images inlined. Requests for
  other models pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Dict, Optional

from .extension import STATUS_PATH
from .messages import RequestError
from .validation import CHECKS, POLICY_KEY, Policy

logger = logging.getLogger("xinf_llama_vision")

#: Xinference's launch route (``xinference launch`` posts here).
LAUNCH_PATH = "/v1/models"
#: Bodies larger than this are left to Xinference (and its own limits) unread.
MAX_BODY_BYTES = 64 * 1024 * 1024


def error_body(message: str, status: int = 400) -> bytes:
    """The error in both shapes clients read: OpenAI's ``error`` object and FastAPI's ``detail``.

    >>> json.loads(error_body("messages: send at least one message"))["error"]["type"]
    'invalid_request_error'
    """
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(
        {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()


class RequestGuard:
    """ASGI middleware: check requests for our models before Xinference's handlers see them."""

    def __init__(self, app, get_supervisor_ref: Callable[[], Awaitable[Any]], auth_service: Any = None):
        self.app = app
        self.get_supervisor_ref = get_supervisor_ref
        self.auth_service = auth_service

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        watched = scope["type"] == "http" and scope["method"] == "POST" and (path in CHECKS or path == LAUNCH_PATH)
        if not watched or not await self._authenticated(scope):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False) and size <= MAX_BODY_BYTES
        body = b"".join(chunks)
        if message.get("more_body", False):  # too large to check here: hand over as it streams in
            return await self.app(scope, _replay(body, receive, more=True), send)
        try:
            if path == LAUNCH_PATH:
                checked = await self._check_launch(body)
            else:
                checked = await self._check(CHECKS[path], body, path)
        except RequestError as e:
            logger.info("refused a request to %s: %s", scope["path"], e)
            return await _respond(send, 400, error_body(str(e)))
        if checked is not None:
            body = json.dumps(checked).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        return await self.app(scope, _replay(body, receive), send)

    async def _authenticated(self, scope) -> bool:
        """With auth on, only requests that pass Xinference's own check are looked at (and fetch images)."""
        if self.auth_service is None:
            return True
        from fastapi.security import SecurityScopes
        from starlette.requests import Request

        request = Request(scope)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        try:
            await self.auth_service(request, SecurityScopes(["models:read"]), token.strip() if scheme.lower() == "bearer" else None)
        except Exception:  # Xinference's handler answers 401/403 itself
            return False
        return True

    async def _check_launch(self, raw: bytes) -> None:
        """A launch of one of our families on an engine that cannot run it here: say why.

        Xinference's own launch error only says "cannot be run on engine vLLM"; the reason our
        engine class gave (shown in the engine listing, merged over the workers) goes with it.
        """
        from .registration import our_families

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
            if key.lower() == engine.lower() and isinstance(value, str):
                raise RequestError(f"Model {name} cannot be run on engine {key}: {value}")
        return None

    async def _check(self, check, raw: bytes, path: str) -> Optional[Dict[str, Any]]:
        """The checked body for one of our models, or ``None`` to pass the request on as it is."""
        try:
            data = json.loads(raw)
        except ValueError:
            return None  # Xinference answers malformed JSON itself
        policy = await self._policy(data.get("model") if isinstance(data, dict) else None)
        if policy is None:
            return None
        # Image downloads and decoding block: keep them off the event loop.
        checked = await asyncio.to_thread(check, data, policy)
        problem = xinference_refusal(path, checked)
        if problem:
            raise RequestError(problem)
        return checked

    async def _policy(self, model_uid: Any) -> Optional[Policy]:
        if not isinstance(model_uid, str) or not model_uid:
            return None
        try:
            description = await (await self.get_supervisor_ref()).describe_model(model_uid)
        except Exception:  # unknown or still loading: Xinference's handler says so
            return None
        policy = description.get(POLICY_KEY) if isinstance(description, dict) else None
        return Policy.from_dict(policy) if isinstance(policy, dict) else None


def xinference_refusal(path: str, body: Dict[str, Any]) -> Optional[str]:
    """Why Xinference's own request model would reject ``body`` (its handler lets that escape as a
    500, e.g. for ``"top_k": null``), or ``None``. Checked here so that the client gets a 400.

    >>> xinference_refusal("/v1/chat/completions", {"model": "m", "messages": [], "top_k": None})
    'top_k: none is not an allowed value'
    >>> xinference_refusal("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}) is None
    True
    """
    try:
        if path == "/v1/chat/completions":
            from xinference.types import CreateChatCompletion as schema
        else:
            from xinference.api.schemas.requests import CreateCompletionRequest as schema
    except ImportError:  # another Xinference layout: its handler decides
        return None
    try:
        schema.parse_obj({k: v for k, v in body.items() if k != "cache_salt"})
    except Exception as e:
        errors = getattr(e, "errors", None)
        if not callable(errors):
            return f"request body: {e}"
        return "; ".join(
            f"{'.'.join(str(p) for p in error.get('loc', ())) or 'request body'}: {error.get('msg', 'invalid')}"
            for error in errors()[:3]
        )
    return None


def _replay(body: bytes, receive, more: bool = False):
    """A ``receive`` that yields ``body`` first, then whatever the client sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


async def _respond(send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


def install(context) -> None:
    """``configure_api``: add the status route and the request guard to Xinference's app."""
    from .registration import status

    @context.app.get(STATUS_PATH, include_in_schema=False)
    async def xinf_llama_vision_status():
        return status()

    context.app.add_middleware(
        RequestGuard,
        get_supervisor_ref=context.get_supervisor_ref,
        auth_service=context.auth_service if context.auth_enabled else None,
    )
