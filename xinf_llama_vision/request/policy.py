"""A launched model's :class:`Policy`: what the API process needs to know about it to check requests.

Each launched model publishes it in its Xinference description (:data:`~.wire.POLICY_KEY`), which any
client allowed to list models can read: it holds nothing an operator would keep to themselves.
Models without one are not ours and pass through untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

from ..parsing import whole_number
from .messages import DEFAULT_MAX_IMAGES


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
