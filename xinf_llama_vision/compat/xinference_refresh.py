"""Xinference's catalog refresh (``xinference.model.llm.register_builtin_model``, Xinference 4.x): our
families are put back after it.

For: xinference >= 4.0, < 5 (measured on 4.1.0). Xinference may rebuild its built-in family list at
run time (``register_builtin_model``), which would bring the built-in entries of our families'
names back; the wrapper runs ``after`` each time it has run. Undone by :func:`uninstall`.
"""

from __future__ import annotations

from typing import Callable

_original = None


def install(after: Callable[[], None]) -> None:
    """Run ``after()`` whenever Xinference refreshes its built-in families in this process (idempotent)."""
    global _original
    import xinference.model.llm as llm

    refresh = llm.register_builtin_model
    if _original is not None or getattr(refresh, "_xlv", False):
        return

    def register_builtin_model():
        refresh()
        after()

    register_builtin_model._xlv = True
    _original = refresh
    llm.register_builtin_model = register_builtin_model


def uninstall() -> None:
    """Undo :func:`install`."""
    global _original
    if _original is None:
        return
    import xinference.model.llm as llm

    llm.register_builtin_model = _original
    _original = None
