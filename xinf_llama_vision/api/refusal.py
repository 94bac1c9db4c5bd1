"""Refusals as our 4xx answers: the error body, what Xinference's own request model would reject, and
what comes back refused from the model process (:class:`Refusal`), streaming included."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, Optional

from starlette.responses import Response

from ..compat.xinference_api import wrap_send
from ..request.wire import ACCEPTED_KEY, FAILURE_KEY, REFUSAL_KEY
from ..request import Policy
from .asgi import respond

logger = logging.getLogger("xinf_llama_vision")


#: What Xinference says (sanitised) when a model is serving as many requests as its ``request_limits``.
XINFERENCE_RATE_LIMIT = "Rate limit reached"
RATE_LIMITED = ("Rate limit reached: this model is serving as many requests as its launch allows "
                "(request_limits); send it again in a moment")


def error_body(message: str, status: int = 400) -> bytes:
    """The error in both shapes clients read: OpenAI's ``error`` object and FastAPI's ``detail``.

    >>> json.loads(error_body("messages: send at least one message"))["error"]["type"]
    'invalid_request_error'
    """
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(
        {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()


def error_response(status: int, message: str) -> Response:
    """An answer with :func:`error_body`."""
    return Response(error_body(message, status), status_code=status, media_type="application/json")


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


def _announced(body: bytes) -> bytes:
    r"""``body`` with its first event, the acceptance marker (:func:`~xinf_llama_vision.engines.common.announced`),
    as the comment ``: accepted``: clients skip comments, proxies see bytes.

    >>> _announced(b': ping\r\n\r\ndata: {"xinf_llama_vision_accepted": true}\r\n\r\ndata: {}\r\n\r\n')
    b': ping\r\n\r\n: accepted\r\n\r\ndata: {}\r\n\r\n'
    """
    lines = body.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(b"data:"))
    lines[at] = b": accepted" + lines[at][len(lines[at].rstrip(b"\r\n")):]
    return b"".join(lines)


def watch(response, policy: Policy):
    """``response``, sent through :class:`Refusal` (the same object and class to Xinference's route
    code: :func:`~xinf_llama_vision.compat.xinference_api.wrap_send`)."""
    return wrap_send(response, lambda send: Refusal(send, policy))


class Refusal:
    """``send`` for a checked request to one of our models: a refusal from the model becomes our 400.

    What only the model process can check (the images, which it fetches and decodes; whether the
    tokenized prompt fits the context) comes back as an answer, or a stream's first event, that
    carries :data:`~xinf_llama_vision.request.wire.REFUSAL_KEY`; vLLM's own context check as
    Xinference's 400, or a stream's first event with the error. Each becomes our 400. A request
    that failed in the engine comes back under :data:`~xinf_llama_vision.request.wire.FAILURE_KEY`
    and becomes a 500 with the engine's message (Xinference would say only that it failed). The start
    of every other answer is only held until its body (or a stream's first event) has come; a stream
    led by :data:`~xinf_llama_vision.request.wire.ACCEPTED_KEY` starts on it, the marker sent as a comment.
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
                if not message.get("body", b"").strip():
                    return  # nothing yet
                # A keep-alive comment, so the stream waits (queued in vLLM, whose first event is its
                # first token): its start goes out now, so that proxies see it alive; an engine's
                # refusal comes before any wait, so nothing is lost (docs/reliability.md).
                payload = {}
        else:
            if message.get("more_body"):
                return
            payload = None
            # A whole answer (200) hides a refusal or a failure only under its key: other answers are not parsed.
            if self.start["status"] != 200 or REFUSAL_KEY.encode() in body or FAILURE_KEY.encode() in body:
                try:
                    payload = json.loads(body)
                except ValueError:
                    pass
        if isinstance(payload, dict) and payload.get(ACCEPTED_KEY) is True:
            # The model process says the stream passed every check and waits for its first output: no
            # refusal below matches it, so its start goes out now (the release at the end), the marker
            # as a comment.
            self.held = [{"type": "http.response.body", "body": _announced(body), "more_body": True}]
        failure = payload.get(FAILURE_KEY) if isinstance(payload, dict) else None
        if isinstance(failure, str):  # one request failed in the engine: a 500 that says so
            self.done = True
            kept = [(k, v) for k, v in self.start.get("headers") or [] if k.lower() == b"x-request-id"]
            return await respond(self.send, 500, error_body(failure, 500), kept)
        if isinstance(payload, dict) and payload.get("error") == XINFERENCE_RATE_LIMIT:
            # Xinference refuses a stream over the model's request_limits in its first event (an error
            # openai-python cannot read): the 429 a plain request gets, which clients retry.
            self.done = True
            kept = [(k, v) for k, v in self.start.get("headers") or [] if k.lower() == b"x-request-id"]
            return await respond(self.send, 429, error_body(RATE_LIMITED, 429), kept + [(b"retry-after", b"1")])
        refusal = refusal_in(payload, self.policy)
        if refusal:
            self.done = True
            logger.info("refused a request: %s", refusal)
            kept = [(k, v) for k, v in self.start.get("headers") or [] if k.lower() == b"x-request-id"]
            return await respond(self.send, 400, error_body(refusal), kept)
        start, held, self.start, self.held = self.start, self.held, None, []
        await self.send(start)
        for m in held:
            await self.send(m)
