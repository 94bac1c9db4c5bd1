"""Request checks that run in Xinference's API process, before a request reaches the model.

Every check that needs only the request and the model's :class:`Policy` runs here first
(:mod:`xinf_llama_vision.api` calls :data:`CHECKS`): a
:class:`~xinf_llama_vision.errors.RequestError` becomes an HTTP 400 with its message, before
Xinference's handler, which would answer most exceptions from a model with a generic 500 (and a
stream with a 200 already sent). Images are not opened here: the model process fetches and
decodes each one once, under the operator's image settings, which stay in the worker; its
refusals come back as 400s too (:func:`~xinf_llama_vision.engines.common.answer_or_refusal`).

Each launched model publishes its :class:`Policy` in its Xinference description, which any
client allowed to list models can read: it holds nothing an operator would keep to themselves.
Models without one are not ours and pass through untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .generation import Sampling, sampling_from_config
from .grammar import check_schema
from .errors import RequestError
from .parsing import whole_number
from .messages import (
    DEFAULT_MAX_IMAGES,
    Prompt,
    build_chat_prompt,
    build_completion_prompt,
    check_tools,
    valid_unicode,
)
from .options import CHAT, COMPLETIONS, check_options

#: The key under which a launched model publishes its policy in its Xinference description.
POLICY_KEY = "xinf_llama_vision"
#: Xinference's REST layer passes only known fields on to the model; a request's separate
#: ``images`` travel inside ``chat_template_kwargs`` under this key.
IMAGES = "xinf_llama_vision_images"
#: Options Xinference's REST layer drops before the model (``n`` everywhere, ``response_format``
#: from completions): the API process carries them to the model under this key instead.
CARRIED = "xinf_llama_vision_options"
CARRIED_NAMES = ("n", "response_format")


@dataclass(frozen=True)
class Policy:
    """What the API process needs to know about one launched model."""

    kind: str  # "base" or "instruct"
    max_images: int = DEFAULT_MAX_IMAGES
    #: Prompt plus output tokens the engine takes; ``None`` when unknown (no up-front check).
    context_length: Optional[int] = None
    #: ``"vllm"``: vLLM samples several choices (``n``) only at a temperature above 0.
    engine: str = "transformers"
    #: The checkpoint decodes greedily when a request sets no temperature (its ``generation_config``).
    greedy_default: bool = False
    #: Why a request may not send more images than ``max_images`` on this engine, when the launch
    #: option is not the whole story (vLLM's own Mllama: one image, Meta's answers).
    image_note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        names = ("kind", "max_images", "context_length", "engine", "greedy_default", "image_note")
        return cls(**{k: data[k] for k in names if k in data})


def launch_policy(kind: str, config: Optional[Mapping[str, Any]], context_length: Optional[int] = None,
                  **engine: Any) -> Policy:
    """The policy of a model launched with ``config`` (its launch options); bad options raise ``ValueError``.

    >>> launch_policy("instruct", {"max_images": "2"}).max_images
    2
    >>> launch_policy("instruct", {"max_images": "two"})
    Traceback (most recent call last):
    ...
    ValueError: launch option max_images must be an integer >= 1, got 'two'
    """
    config = dict(config or {})
    return Policy(kind=kind, max_images=launch_int("max_images", config.get("max_images", DEFAULT_MAX_IMAGES)),
                  context_length=context_length, **engine)


def launch_int(name: str, value: Any) -> int:
    """A launch option that must be a whole number >= 1 (the CLI passes text).

    >>> launch_int("context_length", "8192")
    8192
    """
    return whole_number(value, f"launch option {name}")


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


def chat_prompt(messages: Any, config: Mapping[str, Any], policy: Policy) -> Tuple[Prompt, Optional[List[Dict]]]:
    """A chat request → (prompt, tools); tools are ``None`` when the request has none.

    The API process and every engine build the prompt through this one function.
    """
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
    return prompt, tools


def completion_prompt(prompt: Any, config: Mapping[str, Any], policy: Policy) -> Prompt:
    """A completion request → its prompt and images (any family: the prompt is raw text)."""
    check_options(config, COMPLETIONS)
    request_sampling(config, policy)
    return build_completion_prompt(prompt, request_images(config), max_images=policy.max_images,
                                   image_note=policy.image_note)


def check_chat(body: Any, policy: Policy) -> Dict[str, Any]:
    """Validate a ``/v1/chat/completions`` body; its separate ``images`` travel on to the model."""
    body = json_object(body)
    chat_prompt(body.get("messages"), body, policy)
    check_schema(request_sampling(body, policy).response_format)
    return _carry_options(_carry_images(body))


def check_completion(body: Any, policy: Policy) -> Dict[str, Any]:
    """Validate a ``/v1/completions`` body; its ``images`` travel on to the model."""
    body = json_object(body)
    completion_prompt(body.get("prompt"), body, policy)
    check_schema(request_sampling(body, policy).response_format)
    return _carry_options(_carry_images(body))


def _carry_images(body: Dict[str, Any]) -> Dict[str, Any]:
    """``body`` with its (checked) ``images`` moved where Xinference's REST layer lets them through."""
    if body.get("images") is None:
        return body
    return _carry({k: v for k, v in body.items() if k != "images"}, IMAGES, request_images(body))


def _carry(body: Dict[str, Any], key: str, value: Any) -> Dict[str, Any]:
    """``body`` with ``value`` in its ``chat_template_kwargs`` under ``key`` (which travel to the model)."""
    kwargs = body.get("chat_template_kwargs")
    return {**body, "chat_template_kwargs": {**(kwargs if isinstance(kwargs, dict) else {}), key: value}}


def _carry_options(body: Dict[str, Any]) -> Dict[str, Any]:
    """The options Xinference's REST layer would drop (checked already), moved where it lets them through.

    >>> _carry_options({"n": 3, "prompt": "x"})
    {'prompt': 'x', 'chat_template_kwargs': {'xinf_llama_vision_options': {'n': 3}}}
    """
    carried = {k: body[k] for k in CARRIED_NAMES if body.get(k) is not None}
    if not carried:
        return body
    return _carry({k: v for k, v in body.items() if k not in carried}, CARRIED, carried)


def with_carried(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A model's request config with the options the API process carried put back in place.

    >>> with_carried({"chat_template_kwargs": {CARRIED: {"n": 2}}, "max_tokens": 5})["n"]
    2
    """
    kwargs = config.get("chat_template_kwargs")
    carried = kwargs.get(CARRIED) if isinstance(kwargs, dict) else None
    return {**config, **carried} if isinstance(carried, dict) else dict(config)


#: REST path → the check for it.
CHECKS = {
    "/v1/chat/completions": check_chat,
    "/v1/completions": check_completion,
}
