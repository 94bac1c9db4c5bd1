"""A request, checked once per process: messages or a raw prompt → one :class:`CheckedRequest` (the official
prompt with its images, tools, sampling), and the API process's body checks.

The API process runs :data:`CHECKS` first (:mod:`xinf_llama_vision.api.guard`): a
:class:`~xinf_llama_vision.errors.RequestError` becomes an HTTP 400 with its message, before
Xinference's handler, which would answer most exceptions from a model with a generic 500 (and a
stream with a 200 already sent). The model process builds the same :class:`CheckedRequest` from what
arrives (the wire is JSON, so each process parses its own copy, once) and serves it. Images are not
opened here: the model process fetches and decodes each one once, under the operator's image
settings, which stay in the worker; its refusals come back as 400s too
(:func:`~xinf_llama_vision.engines.common.answer_or_refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from ..errors import RequestError
from ..generation import Sampling, sampling_from_config
from .grammar import check_schema
from .messages import Prompt, build_chat_prompt, build_completion_prompt, check_tools, valid_unicode
from .options import CHAT, COMPLETIONS, check_options
from .policy import Policy
from .wire import IMAGES, carry_images, carry_options, with_carried


@dataclass(frozen=True)
class CheckedRequest:
    """One request, checked: the prompt (text, images, where each image was in the request), its
    sampling options, and its tools (``None`` when it has none)."""

    prompt: Prompt
    sampling: Sampling
    tools: Optional[List[Dict[str, Any]]] = None


def json_object(body: Any) -> Dict[str, Any]:
    """``body`` if it is a JSON object whose every string is valid Unicode.

    >>> json_object([1])
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: request body: expected a JSON object, got an array
    """
    if not isinstance(body, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise RequestError(f"request body: expected a JSON object, got {kinds.get(type(body), 'null')}")
    for key, value in body.items():
        valid_unicode(key, "request body (a key)")
        valid_unicode(value, key)
    return body


def template_options(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The template options a request may set in ``chat_template_kwargs``.

    >>> template_options({"chat_template_kwargs": {"date_string": "26 Jul 2024", "enable_thinking": None}})
    {'date_string': '26 Jul 2024'}
    >>> template_options({"chat_template_kwargs": {"tools_in_user_message": "yes"}})
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: chat_template_kwargs.tools_in_user_message: expected true or false
    """
    kwargs = config.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        return {}
    out: Dict[str, Any] = {}
    if kwargs.get("date_string") is not None:
        if not isinstance(kwargs["date_string"], str):
            raise RequestError("chat_template_kwargs.date_string: expected a string such as '26 Jul 2024'")
        out["date_string"] = kwargs["date_string"]
    if kwargs.get("tools_in_user_message") is not None:
        if not isinstance(kwargs["tools_in_user_message"], bool):
            raise RequestError("chat_template_kwargs.tools_in_user_message: expected true or false")
        out["tools_in_user_message"] = kwargs["tools_in_user_message"]
    return out


def request_images(body: Mapping[str, Any]) -> List[str]:
    """The request's separate ``images`` field, a list of image URLs: a completion's images, or a
    chat's for its ``{"type": "image"}`` parts (once the API process has checked a request, they
    travel on in ``chat_template_kwargs``, where Xinference lets them through).

    >>> request_images({"images": ["data:image/png;base64,AAAA"]})
    ['data:image/png;base64,AAAA']
    >>> request_images({"images": "https://x/y.png"})
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: images: expected a list of image URLs (data: URIs or http(s) URLs), got str
    """
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and IMAGES in kwargs:
        images = kwargs[IMAGES]
    else:
        images = body.get("images")
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) and i.strip() for i in images):
        got = type(images).__name__ if not isinstance(images, list) else "a list with a non-string or empty item"
        raise RequestError(f"images: expected a list of image URLs (data: URIs or http(s) URLs), got {got}")
    return [i.strip() for i in images]


def request_sampling(config: Mapping[str, Any], policy: Policy) -> Sampling:
    """The request's sampling fields, checked; a ``max_tokens`` no prompt leaves room for is refused
    up front (the prompt's own length is checked by the engine, which tokenizes it).

    >>> request_sampling({"max_tokens": 4096}, Policy("base", context_length=4096))
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: max_tokens: 4096 is more than this model's context length of 4096 tokens leaves after the prompt; ask for at most 4095
    """
    out = sampling_from_config(with_carried(config))
    greedy = out.greedy or (out.temperature is None and policy.greedy_default)
    if policy.engine == "vllm" and out.n > 1 and greedy:
        raise RequestError(
            f"n: {out.n} choices need sampling on the vLLM engine (with temperature 0 every choice is the same "
            "answer, and vLLM refuses it); send a temperature above 0, or n=1"
        )
    limit = policy.context_length
    if limit and out.max_tokens is not None and out.max_tokens >= limit:
        raise RequestError(
            f"max_tokens: {out.max_tokens} is more than this model's context length of {limit} tokens leaves "
            f"after the prompt; ask for at most {limit - 1}"
        )
    return out


def chat_request(messages: Any, config: Mapping[str, Any], policy: Policy) -> CheckedRequest:
    """A chat request, checked: the API process and every engine build it through this one function."""
    if policy.kind != "instruct":
        raise RequestError(
            "this is a base (pretrained) model: it has no chat template; send a raw prompt to "
            "/v1/completions (with <|image|> where the image goes), or launch llama-3.2-vision-instruct"
        )
    check_options(config, CHAT)
    sampling = request_sampling(config, policy)
    tools = check_tools(config.get("tools"))
    if tools and sampling.n > 1:
        raise RequestError("n: tool calls come one answer at a time with Llama 3.2 Vision; send n=1 with tools")
    prompt = build_chat_prompt(messages, max_images=policy.max_images, tools=tools, images=request_images(config),
                               image_note=policy.image_note, **template_options(config))
    if tools and config.get("stream"):
        raise RequestError("stream: tool calls cannot be streamed with Llama 3.2 Vision; send stream=false with tools")
    return CheckedRequest(prompt, sampling, tools)


def completion_request(prompt: Any, config: Mapping[str, Any], policy: Policy) -> CheckedRequest:
    """A raw completion request, checked (any family: the prompt is raw text)."""
    check_options(config, COMPLETIONS)
    sampling = request_sampling(config, policy)
    return CheckedRequest(build_completion_prompt(prompt, request_images(config), max_images=policy.max_images,
                                                  image_note=policy.image_note), sampling)


def check_chat(body: Any, policy: Policy) -> Dict[str, Any]:
    """Validate a ``/v1/chat/completions`` body; its separate ``images`` travel on to the model."""
    body = json_object(body)
    check_schema(chat_request(body.get("messages"), body, policy).sampling.response_format)
    return carry_options(carry_images(body, request_images(body)))


def check_completion(body: Any, policy: Policy) -> Dict[str, Any]:
    """Validate a ``/v1/completions`` body; its ``images`` travel on to the model."""
    body = json_object(body)
    check_schema(completion_request(body.get("prompt"), body, policy).sampling.response_format)
    return carry_options(carry_images(body, request_images(body)))


#: REST path → the check for it.
CHECKS = {
    "/v1/chat/completions": check_chat,
    "/v1/completions": check_completion,
}
