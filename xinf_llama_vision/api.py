"""The REST side, installed in Xinference's API process through ``configure_api``.

The plugin adds nothing in front of Xinference's own security. Its checks run **inside** the
routes they guard, as a wrapper of each route's endpoint (``/v1/chat/completions``,
``/v1/completions`` and the launch route ``POST /v1/models``): by the time a wrapper runs,
Xinference's middleware (IP allow-list, CORS, request ids, audit) and the route's own
authentication dependency (with its permission, and its count of failed tokens toward the IP
ban) have passed the request, and every answer of the wrapper leaves through the same stack.

* :class:`Guard`: for a request whose ``model`` is one of ours, after Xinference's check of the
  key's model scope, runs :mod:`.validation`, answers user mistakes with HTTP 400 (streaming or
  not), and hands the endpoint the checked body (images are the model process's to load).
  Requests for any other model, and bodies whose model cannot be read, go to Xinference's
  endpoint untouched. A launch of one of our families on an engine that cannot run it gets the
  engine's reason. A whole (not streamed) answer on the Transformers engine is cancelled when its
  client hangs up (:func:`unless_gone`).
* ``GET /v1/xinf-llama-vision/status``: what the plugin registered, behind the same credential
  as Xinference's ``GET /v1/cluster/version``.
* :class:`Refusal`: what the model process refuses (an image it cannot fetch or decode, a prompt
  that does not fit the context) is a 400 too, streaming included.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from .errors import REFUSAL_KEY, RequestError
from .validation import CHECKS, POLICY_KEY, Policy, json_object

logger = logging.getLogger("xinf_llama_vision")

#: What the plugin registered in this API process (``doctor`` reads it).
STATUS_PATH = "/v1/xinf-llama-vision/status"
#: Xinference's launch route (``xinference launch`` posts here).
LAUNCH_PATH = "/v1/models"
#: Chat and completion bodies for our models larger than this are refused (413).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: How long the API process trusts what it learned about a model UID (ours, with this policy, or not).
POLICY_SECONDS = 5.0


def error_body(message: str, status: int = 400) -> bytes:
    """The error in both shapes clients read: OpenAI's ``error`` object and FastAPI's ``detail``.

    >>> json.loads(error_body("messages: send at least one message"))["error"]["type"]
    'invalid_request_error'
    """
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(
        {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()


def _error(status: int, message: str) -> Response:
    return Response(error_body(message, status), status_code=status, media_type="application/json")


NESTED = "request body: JSON nested too deeply to read; send a flatter body"
_MODEL_FIELD = re.compile(rb'^\s*\{\s*"model"\s*:\s*("(?:[^"\\]|\\.)*")')


def request_model(raw: bytes) -> Tuple[Optional[Dict[str, Any]], Optional[str], Optional[str]]:
    r"""``(body, model UID, why the body cannot be used)``, each as far as it can be read: the UID
    from an object that parses around invalid UTF-8, else from the body's first field, so that a
    body for one of our models gets our 400 even when nothing else in it can be read.

    >>> request_model(b'{"model": "m", "prompt": "\xff"}')[1:], request_model(b"null")
    (('m', "request body: not valid JSON ('utf-8' codec can't decode byte 0xff in position 26: invalid start byte); send a JSON object in UTF-8"), (None, None, None))
    >>> request_model(b'{"model": "m", "max_tokens": [1')[1:]
    ('m', "request body: not valid JSON (Expecting ',' delimiter: line 1 column 32 (char 31)); send a JSON object")
    """
    problem = None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # read on around it, to find the model
        problem = f"request body: not valid JSON ({e}); send a JSON object in UTF-8"
        text = raw.decode("utf-8", "surrogateescape")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        found = _MODEL_FIELD.match(raw)
        why = NESTED if isinstance(e, RecursionError) else f"request body: not valid JSON ({e}); send a JSON object"
        return (None, json.loads(found.group(1)), why) if found else (None, None, None)
    if not isinstance(data, dict):
        return None, None, None
    model = data.get("model")
    return data, model if isinstance(model, str) and model else None, problem


class Guard:
    """The checks the wrapped endpoints run for our models (see the module's docstring)."""

    def __init__(self, get_supervisor_ref: Callable[[], Awaitable[Any]]):
        self.get_supervisor_ref = get_supervisor_ref
        self._policies: Dict[str, Tuple[float, Optional[Policy]]] = {}

    async def request(self, path: str, endpoint, args, kwargs):
        """A chat or completion request, after Xinference's authentication and permission."""
        from starlette.requests import Request

        request = kwargs["request"]
        raw = await request.body()  # Starlette keeps it: the endpoint reads the same bytes
        data, model, problem = request_model(raw)
        policy = await self.policy(model) if model else None
        if policy is None:
            return await endpoint(*args, **kwargs)  # not ours: exactly as without the plugin
        api = getattr(request.app.state, "api", None)
        check_access = getattr(api, "_check_model_access", None)
        if check_access is not None:  # the key's model scope: Xinference's 403 before we read more
            check_access(request, model, "LLM")
        try:
            if len(raw) > MAX_BODY_BYTES:
                return _error(413, f"request body: more than {MAX_BODY_BYTES // 2**20} MiB, the most this server "
                                   "reads; send images as http(s) URLs or smaller images, and less text")
            if problem:
                raise RequestError(problem)
            json_object(data)
            checked = await asyncio.to_thread(CHECKS[path], data, policy)  # image downloads block
            problem = xinference_refusal(path, checked)
            if problem:
                raise RequestError(problem)
        except RecursionError:  # parsed, but too deep for the checks' walk
            return _error(400, NESTED)
        except RequestError as e:
            logger.info("refused a request to %s: %s", path, e)
            return _error(400, str(e))
        kwargs["request"] = Request(request.scope, _replay(json.dumps(checked).encode(), request.receive))
        call = endpoint(*args, **kwargs)
        if policy.engine == "transformers" and not checked.get("stream"):
            call = unless_gone(call, request.receive)  # Xinference races this itself for vLLM and streams
        try:
            response = await call
        except HTTPException as e:  # a non-streamed context-length refusal of vLLM's is raised, not returned
            refusal = refusal_in(e.detail, policy) if e.status_code == 400 else None
            if refusal is None:
                raise
            logger.info("refused a request: %s", refusal)
            return _error(400, refusal)
        return watch(response, policy)

    async def launch(self, path: str, endpoint, args, kwargs):
        """A launch, after Xinference's ``models:write`` check."""
        from starlette.requests import Request

        request = kwargs["request"]
        try:
            checked = await self._check_launch(await request.body())
        except RequestError as e:
            logger.info("refused a launch: %s", e)
            return _error(400, str(e))
        if checked is not None:
            kwargs["request"] = Request(request.scope, _replay(json.dumps(checked).encode(), request.receive))
        return await endpoint(*args, **kwargs)

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
        from .quantization import NEEDS, refusal

        fmt, quantization = data.get("model_format"), data.get("quantization")
        if not isinstance(fmt, str) or not isinstance(quantization, str):
            return None
        why = refusal(engine.lower(), fmt, quantization)
        if why or not isinstance(listed, list):
            return why
        offered = any(isinstance(p, dict) and p.get("model_format") == fmt and quantization in (p.get("quantizations") or [])
                      for p in listed)
        return None if offered else NEEDS.get(fmt)

    async def policy(self, model_uid: str) -> Optional[Policy]:
        """The policy of a running model of ours, ``None`` for any other (or unknown) model; what the
        supervisor said is kept for a few seconds, so a burst of requests asks it once."""
        now = time.monotonic()
        known = self._policies.get(model_uid)
        if known is not None and now - known[0] < POLICY_SECONDS:
            return known[1]
        try:
            description = await (await self.get_supervisor_ref()).describe_model(model_uid)
        except Exception:  # unknown or still loading: Xinference's handler says so
            return None
        data = description.get(POLICY_KEY) if isinstance(description, dict) else None
        policy = Policy.from_dict(data) if isinstance(data, dict) else None
        if len(self._policies) > 1024:
            self._policies.clear()
        self._policies[model_uid] = (now, policy)
        return policy


def wrap_endpoint(route, hook) -> None:
    """Run ``hook(path, endpoint, args, kwargs)`` in place of ``route``'s endpoint (same signature, so
    FastAPI resolves the same parameters and runs the route's dependencies first)."""
    endpoint = route.endpoint

    @functools.wraps(endpoint)
    async def guarded(*args, **kwargs):
        return await hook(route.path, endpoint, args, kwargs)

    route.endpoint = guarded  # what include_router copies
    route.dependant.call = guarded  # a route already built into an app


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


def refusal_in(payload: Any, policy: Policy) -> Optional[str]:
    """The message of our 400 for what came back from the model (an answer, the first event of a
    stream, an error's detail), else ``None``: an engine's refusal, or a context-length refusal in
    Xinference's or vLLM's words.

    >>> refusal_in({REFUSAL_KEY: "images[0]: not an image"}, Policy("base"))
    'images[0]: not an image'
    >>> refusal_in({"choices": []}, Policy("base")) is None
    True
    """
    if isinstance(payload, dict):
        if isinstance(payload.get(REFUSAL_KEY), str):
            return payload[REFUSAL_KEY]
        payload = payload.get("error", payload.get("detail"))
    return context_refusal(payload, policy)


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


_WATCHED: Dict[type, type] = {}


def watch(response, policy: Policy):
    """``response``, sent through :class:`Refusal` (same class to Xinference's route code, which
    logs streams by their type: a subclass that only wraps ``send``)."""
    cls = type(response)
    if not hasattr(response, "__call__") or cls.__module__ == __name__:
        return response
    if cls not in _WATCHED:
        async def call(self, scope, receive, send):
            await cls.__call__(self, scope, receive, Refusal(send, self._xlv_policy))

        _WATCHED[cls] = type(cls.__name__, (cls,), {"__call__": call, "__module__": __name__})
    response.__class__ = _WATCHED[cls]
    response._xlv_policy = policy
    return response


class Refusal:
    """``send`` for a checked request to one of our models: a refusal from the model becomes our 400.

    What only the model process can check (the images, which it fetches and decodes; whether the
    tokenized prompt fits the context) comes back as an answer, or a stream's first event, that
    carries :data:`~xinf_llama_vision.errors.REFUSAL_KEY`; vLLM's own context check as
    Xinference's 400, or a stream's first event with the error. Each becomes our 400. The start
    of every other answer is only held until its body (or a stream's first event) has come.
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
            if message["status"] in (200, 400):
                self.start = message
                return
            return await self.send(message)
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.held.append(message)
        body = b"".join(m.get("body", b"") for m in self.held)
        headers = dict(self.start.get("headers") or [])
        if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            payload = _first_event(body)
            if payload is None and message.get("more_body"):
                return  # pings only so far
        else:
            if message.get("more_body"):
                return
            payload = None
            # A whole answer (200) hides a refusal only under REFUSAL_KEY: other answers are not parsed.
            if self.start["status"] != 200 or REFUSAL_KEY.encode() in body:
                try:
                    payload = json.loads(body)
                except ValueError:
                    pass
        refusal = refusal_in(payload, self.policy)
        if refusal:
            self.done = True
            logger.info("refused a request: %s", refusal)
            kept = [(k, v) for k, v in self.start.get("headers") or [] if k.lower() == b"x-request-id"]
            return await _respond(self.send, 400, error_body(refusal), kept)
        start, held, self.start, self.held = self.start, self.held, None, []
        await self.send(start)
        for m in held:
            await self.send(m)


async def unless_gone(call: Awaitable[Any], receive) -> Any:
    """``call``'s answer; if the client hangs up first, ``call`` is cancelled (through Xinference's
    actor call, down to the engine, whose rows leave the batch) and the answer is an empty 499.
    ``receive`` is the client's, with the body already read: its next message is the hang-up."""

    async def hang_up() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(call), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    await asyncio.gather(answer, return_exceptions=True)
    logger.info("a client hung up before its answer: the request was cancelled")
    return Response(status_code=499)


def _replay(body: bytes, receive):
    """A ``receive`` that yields ``body`` first, then whatever the client sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _respond(send, status: int, body: bytes, headers=()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": body})


def install(context) -> None:
    """``configure_api``: the status route, and the guard around the routes it checks."""
    from fastapi.routing import APIRoute

    from .registration import status

    routes = [r for r in context.router.routes if isinstance(r, APIRoute)]
    version = next((r for r in routes if r.path == "/v1/cluster/version"), None)

    async def xinf_llama_vision_status() -> JSONResponse:
        return JSONResponse(status())

    context.router.add_api_route(STATUS_PATH, xinf_llama_vision_status, methods=["GET"], include_in_schema=False,
                                 dependencies=list(version.dependencies) if version is not None else None)
    guard = Guard(context.get_supervisor_ref)
    wrapped = []
    for route in routes:
        if "POST" in route.methods and route.path in CHECKS:
            wrap_endpoint(route, guard.request)
            wrapped.append(route.path)
        elif "POST" in route.methods and route.path == LAUNCH_PATH:
            wrap_endpoint(route, guard.launch)
            wrapped.append(route.path)
    if len(wrapped) != len(CHECKS) + 1:
        logger.warning("xinf-llama-vision: request checks installed on %s only (this Xinference's routes differ)",
                       wrapped)
