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
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from starlette.exceptions import HTTPException

from ..errors import RequestError
from ..request import CHECKS, Policy, json_object
from ..request.wire import POLICY_KEY
from .asgi import replay, unless_gone
from .refusal import error_response, refusal_in, watch, xinference_refusal

logger = logging.getLogger("xinf_llama_vision")

#: Chat and completion bodies for our models larger than this are refused (413).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: How long the API process trusts what it learned about a model UID (ours, with this policy, or not).
POLICY_SECONDS = 5.0

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
    """The checks the wrapped chat and completion endpoints run for our models (see the module's docstring)."""

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
                return error_response(413, f"request body: more than {MAX_BODY_BYTES // 2**20} MiB, the most this "
                                           "server reads; send images as http(s) URLs or smaller images, and less text")
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
        return watch(response, policy)

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
