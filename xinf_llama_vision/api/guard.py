"""Chat and completion requests for our models, checked inside Xinference's routes (:class:`Guard`).

For a request whose ``model`` is one of ours, after Xinference's check of the key's model scope,
the guard runs :mod:`xinf_llama_vision.request`, answers user mistakes with HTTP 400 (streaming
or not), and hands the endpoint the checked body (images are the model process's to load).
Requests for any other model, and bodies whose model cannot be read (:func:`request_model`), go to
Xinference's endpoint untouched. A whole (not streamed) answer on the Transformers engine is
cancelled when its client hangs up (:func:`~.asgi.unless_gone`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..compat.xinference_api import keep_alive
from ..errors import RequestError
from ..request import CHECKS, Policy, json_object
from ..request.wire import POLICY_KEY, carry_scope
from .asgi import replay, unless_gone
from .refusal import error_response, refusal_in, watch, xinference_refusal

logger = logging.getLogger("xinf_llama_vision")

#: Chat and completion bodies for our models larger than this are refused (413).
MAX_BODY_BYTES = 64 * 1024 * 1024
TOO_LARGE = (f"request body: more than {MAX_BODY_BYTES // 2**20} MiB, the most this server reads; send images "
             "as http(s) URLs or smaller images, and less text")
#: The longest a stream of ours stays silent: a keep-alive comment at least this often (a proxy with an
#: idle timeout would cut a queued stream under Xinference's 600-second default).
KEEPALIVE_SECONDS = 15
#: How long the API process trusts what it learned about a model UID (ours, with this policy, or not).
POLICY_SECONDS = 5.0

NESTED = "request body: JSON nested too deeply to read; send a flatter body"
#: Bodies larger than this are parsed in a worker thread, not on the API process's event loop.
PARSE_INLINE_BYTES = 1 << 20
#: A body's ``model`` field wherever it is (OpenAI's clients send ``messages`` first), for a body
#: over the limit: only its first bytes are read.
_ANY_MODEL_FIELD = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')
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


async def read_body(request, limit: int) -> Tuple[bytes, Optional[Any]]:
    """``(body, None)``, or, for a body over ``limit`` bytes, ``(its first bytes, the rest's stream)``:
    the rest is read only if the request turns out not to be for one of our models."""
    stream = request.stream()
    parts, size = [], 0
    async for chunk in stream:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts), stream
    return b"".join(parts), None


def named_model(head: bytes) -> Optional[str]:
    """The UID the first ``"model"`` field in ``head`` names (the start of a body too large to read).

    >>> named_model(b'{"messages": [{"role": "user", "content": "hi"}], "model": "m1", "x": "')
    'm1'
    """
    found = _ANY_MODEL_FIELD.search(head)
    try:
        return json.loads(found.group(1)) if found else None
    except ValueError:
        return None


def cache_scope(request) -> str:
    """Whose request this is, for the image cache: a hash of its credential (an ``xf-`` key or a
    token), ``""`` without one (authentication off: one scope). Two credentials never share a cached
    image, so a fast answer tells nobody what another key sent (docs/performance.md)."""
    credential = request.headers.get("authorization", "")
    return hashlib.blake2b(credential.encode(), digest_size=16).hexdigest() if credential else ""


class Guard:
    """The checks the wrapped chat and completion endpoints run for our models (see the module's docstring)."""

    def __init__(self, get_supervisor_ref: Callable[[], Awaitable[Any]]):
        self.get_supervisor_ref = get_supervisor_ref
        self._policies: Dict[str, Tuple[float, Optional[Policy]]] = {}

    async def request(self, path: str, endpoint, args, kwargs):
        """A chat or completion request, after Xinference's authentication and permission."""
        request = kwargs["request"]
        raw, rest = await read_body(request, MAX_BODY_BYTES)
        if rest is not None:  # too large: refused unread if it is for one of ours, else read on
            model = await asyncio.to_thread(named_model, raw)
            if model and await self.policy(model) is not None:
                self.check_access(request, model)
                return error_response(413, TOO_LARGE)
            raw += b"".join([chunk async for chunk in rest])
        # The endpoint reads the same bytes (the stream is read; the client's next message is its hang-up).
        kwargs["request"] = Request(request.scope, replay(raw, request.receive))
        parse = asyncio.to_thread(request_model, raw) if len(raw) > PARSE_INLINE_BYTES else None
        data, model, problem = await parse if parse else request_model(raw)
        policy = await self.policy(model) if model else None
        if policy is None:
            return await endpoint(*args, **kwargs)  # not ours: exactly as without the plugin
        self.check_access(request, model)
        try:
            if len(raw) > MAX_BODY_BYTES:
                return error_response(413, TOO_LARGE)
            if problem:
                raise RequestError(problem)
            json_object(data)
            checked = await asyncio.to_thread(CHECKS[path], data, policy)  # image downloads block
            problem = xinference_refusal(path, checked)
            if problem:
                raise RequestError(problem)
        except RecursionError:  # parsed, but too deep for the checks' walk
            return error_response(400, NESTED)
        except RequestError as e:
            logger.info("refused a request to %s: %s", path, e)
            return error_response(400, str(e))
        checked = carry_scope(checked, cache_scope(request))
        kwargs["request"] = Request(request.scope, replay(json.dumps(checked).encode(), request.receive))
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
            return error_response(400, refusal)
        keep_alive(response, KEEPALIVE_SECONDS)
        return watch(response, policy)

    @staticmethod
    def check_access(request, model: str) -> None:
        """The key's model scope: Xinference's 403, before we read more."""
        api = getattr(request.app.state, "api", None)
        check = getattr(api, "_check_model_access", None)
        if check is not None:
            check(request, model, "LLM")

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
