"""What travels between Xinference's API process and a model process beyond OpenAI's fields: every key in
one place, and how a checked body carries what Xinference's REST layer would drop.

* A launched model publishes its :class:`~.policy.Policy` in its Xinference description under
  :data:`POLICY_KEY`.
* Xinference's REST layer passes only known fields on to the model: a request's separate ``images``
  travel inside ``chat_template_kwargs`` under :data:`IMAGES`, and the options it drops (``n``
  everywhere, ``response_format`` from completions) under :data:`CARRIED`.
* Whose request it is, for the image cache, travels under :data:`SCOPE`: set by the API guard from
  the request's credential, whatever the client sent there.
* A refusal found in the model process comes back as the answer ``{REFUSAL_KEY: message}``
  (``engines.common.answer_or_refusal``), which the API process turns into a 400; a request that
  failed in the engine as ``{FAILURE_KEY: message}``, which it turns into a 500 with that message.
* A vLLM stream whose first output is slow to come (queued) is led by ``{ACCEPTED_KEY: True}``
  (``engines.common.announced``): the API process sends the stream's headers on it, and a comment
  in its place.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

#: The key under which a launched model publishes its policy in its Xinference description.
POLICY_KEY = "xinf_llama_vision"
#: A request's separate ``images``, inside ``chat_template_kwargs``.
IMAGES = "xinf_llama_vision_images"
#: The options Xinference's REST layer would drop, inside ``chat_template_kwargs``.
CARRIED = "xinf_llama_vision_options"
CARRIED_NAMES = ("n", "response_format")
#: Whose request it is, for the image cache (a hash of its credential, set by the API guard), inside
#: ``chat_template_kwargs``: entries are shared only within one scope.
SCOPE = "xinf_llama_vision_scope"
#: The key of a model's answer that stands for a :class:`~xinf_llama_vision.errors.RequestError`.
REFUSAL_KEY = "xinf_llama_vision_refusal"
#: The key of a model's answer that stands for a :class:`~xinf_llama_vision.errors.RequestFailed`.
FAILURE_KEY = "xinf_llama_vision_failure"
#: The key of a stream's first chunk that says only "accepted, past every check, waiting for its first output".
ACCEPTED_KEY = "xinf_llama_vision_accepted"


def carry_images(body: Dict[str, Any], images: List[str]) -> Dict[str, Any]:
    """``body`` with its (checked) ``images`` moved where Xinference's REST layer lets them through.

    >>> carry_images({"prompt": "x", "images": ["a"]}, ["a"])
    {'prompt': 'x', 'chat_template_kwargs': {'xinf_llama_vision_images': ['a']}}
    """
    if body.get("images") is None:
        return body
    return _carry({k: v for k, v in body.items() if k != "images"}, IMAGES, images)


def _carry(body: Dict[str, Any], key: str, value: Any) -> Dict[str, Any]:
    """``body`` with ``value`` in its ``chat_template_kwargs`` under ``key`` (which travel to the model)."""
    kwargs = body.get("chat_template_kwargs")
    return {**body, "chat_template_kwargs": {**(kwargs if isinstance(kwargs, dict) else {}), key: value}}


def carry_options(body: Dict[str, Any]) -> Dict[str, Any]:
    """The options Xinference's REST layer would drop (checked already), moved where it lets them through.

    >>> carry_options({"n": 3, "prompt": "x"})
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


def carry_scope(body: Dict[str, Any], scope: str) -> Dict[str, Any]:
    """``body`` with the image cache's ``scope`` where it travels to the model (replacing any the client sent).

    >>> carry_scope({"prompt": "x", "chat_template_kwargs": {SCOPE: "forged"}}, "ab12")["chat_template_kwargs"]
    {'xinf_llama_vision_scope': 'ab12'}
    """
    return _carry(body, SCOPE, scope)


def request_scope(config: Mapping[str, Any]) -> str:
    """The image cache's scope of a request the API guard passed on (``""``: none, one shared scope).

    >>> request_scope({"chat_template_kwargs": {SCOPE: "ab12"}}), request_scope({})
    ('ab12', '')
    """
    kwargs = config.get("chat_template_kwargs")
    scope = kwargs.get(SCOPE) if isinstance(kwargs, dict) else None
    return scope if isinstance(scope, str) else ""
