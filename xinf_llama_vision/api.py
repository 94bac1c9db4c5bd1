"""The REST side, installed in Xinference's API process through ``configure_api``.

* ``GET /v1/xinf-llama-vision/status``: what the plugin registered in the API process.
* :class:`RequestGuard`, an ASGI middleware in front of ``/v1/chat/completions``,
  ``/v1/completions`` and the launch route ``/v1/models`` (where it adds the reason an engine
  cannot run our family to Xinference's bare refusal): for a model launched by this plugin it runs :mod:`.validation` before
  Xinference's own handler, answers user mistakes with HTTP 400 (the same for streaming and
  non-streaming requests), and hands the handler the body with images inlined. Requests for
  other models pass through untouched, unless no handler could read them (not JSON, invalid
  Unicode, no model UID): those are a 400 for any model instead of Xinference's 500.
* :class:`ContextRefusal`: a prompt that does not fit the context, found by the engine, is a 400
  too (streaming included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from .extension import STATUS_PATH
from .messages import RequestError
from .validation import CHECKS, POLICY_KEY, Policy, json_object

logger = logging.getLogger("xinf_llama_vision")

#: Xinference's launch route (``xinference launch`` posts here).
LAUNCH_PATH = "/v1/models"
#: Chat and completion bodies larger than this are refused (413); other large bodies are left to
#: Xinference unread.
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
        if message.get("more_body", False):  # too large to check here
            if path in CHECKS:  # unchecked, its images would reach the model and a refusal there is a 500
                return await _respond(send, 413, error_body(
                    f"request body: more than {MAX_BODY_BYTES // 2**20} MiB, the most this server reads; send "
                    "images as http(s) URLs or smaller images, and less text", 413))
            return await self.app(scope, _replay(body, receive, more=True), send)
        policy = None
        try:
            if path == LAUNCH_PATH:
                checked = await self._check_launch(body)
            else:
                checked, policy = await self._check(CHECKS[path], body, path)
            if checked is not None:
                body = json.dumps(checked).encode()
        except RecursionError:
            return await _respond(send, 400, error_body("request body: JSON nested too deeply to read; send a flatter body"))
        except RequestError as e:
            logger.info("refused a request to %s: %s", scope["path"], e)
            return await _respond(send, 400, error_body(str(e)))
        if checked is not None:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        if policy is not None:
            send = ContextRefusal(send, policy)
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

    async def _check_launch(self, raw: bytes) -> Optional[Dict[str, Any]]:
        """A launch of one of our families: on an engine that cannot run it here, say why; on an
        engine whose model process needs environment variables (``ENGINE_ENVS``), add them to the
        launch's ``envs``, which Xinference sets in the model process before anything is imported.

        Xinference's own launch error only says "cannot be run on engine vLLM"; the reason our
        engine class gave (shown in the engine listing, merged over the workers) goes with it.
        """
        from .registration import ENGINE_ENVS, our_families

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
        needed = ENGINE_ENVS.get(engine.lower())
        if not needed:
            return None
        given = data.get("envs") if isinstance(data.get("envs"), dict) else {}
        return {**data, "envs": {**given, **needed}}

    async def _check(self, check, raw: bytes, path: str) -> Tuple[Optional[Dict[str, Any]], Optional[Policy]]:
        """``(checked body, policy)`` for one of our models, ``(None, None)`` to pass the request on as it is.

        A body no handler could read is refused for any model: Xinference would answer it with a 500.
        """
        try:
            data = json.loads(raw)
        except ValueError as e:  # invalid UTF-8 too
            raise RequestError(f"request body: not valid JSON ({e}); send a JSON object") from None
        json_object(data)  # an object, in valid Unicode
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise RequestError("model: send the UID of a running model as a string")
        policy = await self._policy(data["model"])
        if policy is None:
            return None, None
        # Image downloads and decoding block: keep them off the event loop.
        checked = await asyncio.to_thread(check, data, policy)
        problem = xinference_refusal(path, checked)
        if problem:
            raise RequestError(problem)
        return checked, policy

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


#: The text Xinference puts in place of a chat request's ``ContextLengthExceeded`` (it hides worker text).
XINFERENCE_CONTEXT_DETAIL = "Request exceeds the model's configured context length."
_ENGINE_CONTEXT_MESSAGE = re.compile(r"the prompt is \d+ tokens.*context length of \d+ tokens.*", re.S)


def context_refusal(detail: Any, policy: Policy) -> Optional[str]:
    """Our message for a context-length refusal that came back from the engine, else ``None``.

    The engine's own words where Xinference passed them on (behind the worker's address):

    >>> context_refusal("[address=127.0.0.1:5, pid=6] the prompt is 9 tokens and max_tokens is 99: together "
    ...                 "more than this model's context length of 100 tokens; lower max_tokens to at most 91", Policy("base"))
    "the prompt is 9 tokens and max_tokens is 99: together more than this model's context length of 100 tokens; lower max_tokens to at most 91"
    >>> context_refusal(XINFERENCE_CONTEXT_DETAIL, Policy("instruct", context_length=4096))
    "the prompt and max_tokens do not fit this model's context length of 4096 tokens; lower max_tokens or shorten the prompt"
    >>> context_refusal("CUDA out of memory", Policy("base")) is None
    True
    """
    if not isinstance(detail, str):
        return None
    found = _ENGINE_CONTEXT_MESSAGE.search(detail)
    if found:
        return found.group()
    if detail.strip() == XINFERENCE_CONTEXT_DETAIL:
        size = f" of {policy.context_length} tokens" if policy.context_length else ""
        return f"the prompt and max_tokens do not fit this model's context length{size}; lower max_tokens or shorten the prompt"
    return None


def _first_event(body: bytes) -> Optional[Any]:
    r"""The data of the first complete server-sent event in ``body`` (pings skipped), ``None`` if none yet.

    >>> _first_event(b": ping\r\n\r\ndata: {\"error\": \"x\"}\r\n\r\n")
    {'error': 'x'}
    >>> _first_event(b": ping\r\n\r\ndata: {\"err") is None
    True
    """
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        data = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            try:
                return json.loads(b"\n".join(data))
            except ValueError:
                return {}
    return None


class ContextRefusal:
    """``send`` for a checked request to one of our models.

    Whether prompt plus ``max_tokens`` fit the context is known only once the engine has
    tokenized the prompt. Xinference answers the engine's ``ContextLengthExceeded`` with a 400 in
    its own words, and when streaming with a 200 whose first event is the error. Both become our
    400; the start of every other answer is only held until its first event.
    """

    def __init__(self, send, policy: Policy):
        self.send, self.policy = send, policy
        self.start: Optional[Dict[str, Any]] = None
        self.held: list = []
        self.done = False

    async def __call__(self, message) -> None:
        if self.done:
            return  # our 400 went out; the rest of Xinference's answer is dropped
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            if message["status"] == 400 or (
                message["status"] == 200 and headers.get(b"content-type", b"").startswith(b"text/event-stream")
            ):
                self.start = message
                return
            return await self.send(message)
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.held.append(message)
        body = b"".join(m.get("body", b"") for m in self.held)
        if self.start["status"] == 400:
            if message.get("more_body"):
                return
            try:
                detail = json.loads(body).get("detail")
            except (ValueError, AttributeError):
                detail = None
        else:
            event = _first_event(body)
            if event is None and message.get("more_body"):
                return  # pings only so far
            detail = event.get("error") if isinstance(event, dict) else None
        refusal = context_refusal(detail, self.policy)
        if refusal:
            self.done = True
            logger.info("refused a request: %s", refusal)
            return await _respond(self.send, 400, error_body(refusal))
        start, held, self.start, self.held = self.start, self.held, None, []
        await self.send(start)
        for m in held:
            await self.send(m)


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
