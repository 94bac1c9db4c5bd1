"""Naming an image source in messages and logs: short, printable, never a whole data URI or a password."""

from __future__ import annotations

import urllib.parse
from typing import Any


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def describe(source: Any) -> str:
    """A short, log-safe name for an image source (never a whole data URI, never a password).

    >>> describe("data:image/png;base64," + "A" * 100)
    'data:image/png;base64,… (100 base64 chars)'
    >>> describe("https://example.com/cat.png")
    'https://example.com/cat.png'
    >>> describe("https://bob:hunter2@example.com/a\\r\\n.png")
    'https://bob:***@example.com/a\\\\r\\\\n.png'
    >>> describe("x" * 300)[-5:], len(describe("x" * 300))
    ('xxxx…', 201)
    """
    if not isinstance(source, str):
        return f"<{type(source).__name__}>"
    if source[:5].lower() == "data:":
        head, sep, payload = source.partition(",")
        short = _printable(head[:60]) + ("…" if len(head) > 60 else "")
        if not sep:
            return f"{short} (no ',' separator, {len(source)} chars)"
        return f"{short},… ({len(payload)} base64 chars)"
    try:
        parts = urllib.parse.urlsplit(source)
        if parts.password:
            source = source.replace(":" + parts.password + "@", ":***@", 1)
    except ValueError:
        pass
    text = _printable(source)
    return text if len(text) <= 200 else text[:200] + "…"
