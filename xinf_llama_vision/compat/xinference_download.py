"""Xinference's weight download (``LLMCacheManager.cache``, Xinference 4.x): a failed download of one of
our families re-raised in words that say what to do.

For: xinference >= 4.0, < 5 (measured on 4.1.0). Xinference has no hook between "the engine class
was chosen" and "the engine instance is created", and the download happens right there, in the
worker process; it retries and then reports only "Failed to download model … after multiple
retries", dropping the reason. The wrapper asks ``explain(family, error, name, repo id, hub)`` for a
message; ``None`` (another model, a local ``model_uri``, a draft model) re-raises the original
error unchanged. Installed by registration in every Xinference process, undone by
:func:`uninstall`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from ..errors import WeightsUnavailable

#: ``explain(llm_family, error, model_name, repo_id, hub)`` → the message, or ``None`` to re-raise unchanged.
Explain = Callable[[Any, BaseException, str, Optional[str], Optional[str]], Optional[str]]

_original = None


def install(explain: Explain) -> None:
    """Wrap ``LLMCacheManager.cache`` in this process (idempotent)."""
    global _original
    from xinference.model.llm.cache_manager import LLMCacheManager

    if _original is not None or getattr(LLMCacheManager.cache, "_xlv", False):
        return
    original = LLMCacheManager.cache

    @functools.wraps(original)
    def cache(self):
        try:
            return original(self)
        except WeightsUnavailable:
            raise
        except Exception as e:
            if getattr(self, "_model_uri", None) is not None or getattr(self, "_use_draft_model", False):
                raise
            message = explain(self._llm_family, e, self._model_name, getattr(self, "_model_id", None),
                              getattr(self, "_model_hub", None))
            if message is None:
                raise
            raise WeightsUnavailable(message) from e

    cache._xlv = True
    LLMCacheManager.cache = cache
    _original = original


def uninstall() -> None:
    """Undo :func:`install`."""
    global _original
    if _original is None:
        return
    from xinference.model.llm.cache_manager import LLMCacheManager

    LLMCacheManager.cache = _original
    _original = None
