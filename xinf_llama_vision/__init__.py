"""Llama 3.2 Vision for Xinference.

Importing this package is cheap: nothing of Xinference, torch or transformers is loaded
until :func:`register` is called (Xinference calls it through the extension factory
``xinf_llama_vision.extension:create``; see ``docs/activation.md``).
"""

from ._version import __version__

__all__ = ["__version__", "register", "unregister"]


def register() -> None:
    """Register our families and engines with Xinference in this process (idempotent)."""
    from .registration import register as _register

    _register()


def unregister() -> None:
    """Undo :func:`register` in this process: Xinference's built-ins come back."""
    from .registration import unregister as _unregister

    _unregister()
