"""The one image loader every engine uses: image sources → validated bytes → RGB PIL images.

It runs in the model process, under the model's :class:`~.limits.ImageLimits` (the
worker's settings). Accepted sources:

* ``data:`` URIs with a base64 payload (:func:`~.sources.decode_data_uri`);
* ``http://`` and ``https://`` URLs whose host is a public address, or one the operator
  allow-listed, fetched by :func:`~.fetch.fetch` (urllib3, pinned to the checked
  addresses, every redirect hop checked again);
* ``file://`` URLs and paths, only when the operator allowed one directory, and only for regular
  files whose resolved path (symlinks followed) stays inside it (:func:`~.sources.read_local`).

Everything else is refused. The bytes must be a PNG, JPEG (MPO), GIF, WebP or BMP image that
Pillow decodes completely (:func:`~.decode.decode`); animated images give their first frame.
Nothing is written to disk. The settings are :mod:`.limits`', the addresses :mod:`.addresses`', the
network :mod:`.fetch`'s.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

from ..errors import ImageError
from .decode import decode
from .fetch import fetch
from .limits import ImageLimits
from .naming import describe
from .sources import decode_data_uri, read_local


def _scheme(source: str) -> str:
    """The URL scheme, lower case, or ``""`` for a bare path.

    >>> _scheme("HTTPS://x"), _scheme("data:,"), _scheme("/tmp/a.png"), _scheme("cat.png")
    ('https', 'data', '', '')
    """
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", source)
    return match.group(1).lower() if match else ""


def read_bytes(source: str, limits: ImageLimits) -> bytes:
    """The raw bytes of an image source, every transport check applied (not yet decoded)."""
    if not isinstance(source, str) or not source:
        raise ImageError(f"{describe(source)}: an image source must be a non-empty string")
    scheme = _scheme(source)
    if scheme == "data":
        return decode_data_uri(source, limits)
    if scheme in ("http", "https"):
        return fetch(source, limits)
    if scheme in ("file", ""):
        return read_local(source, limits)  # refused unless the operator allowed a directory
    raise ImageError(
        f"{describe(source)}: unsupported image source (scheme {scheme!r}); send a data: URI (base64) or an http(s) URL"
    )


def load_image(source: str, limits: Optional[ImageLimits] = None):
    """One image source → a fully decoded RGB PIL image, or :class:`ImageError`."""
    limits = limits if limits is not None else ImageLimits.from_config(None)
    image, _ = decode(read_bytes(source, limits), source, limits)
    return image


def load_images(sources: Sequence[str], limits: ImageLimits, where: Sequence[str] = ()) -> list:
    """Every source in order, as RGB PIL images; a refusal names where the image was in the request
    (``where``, e.g. ``messages[0].content[1]: …``)."""
    return [decode_image(data, source, limits, _at(where, k))
            for k, (source, data) in enumerate(zip(sources, read_images(sources, limits, where)))]


def read_images(sources: Sequence[str], limits: ImageLimits, where: Sequence[str] = ()) -> List[bytes]:
    """Every source's raw bytes, in order, every transport check applied (:func:`read_bytes`), not yet
    decoded; a refusal names where the image was in the request."""
    out = []
    for k, source in enumerate(sources):
        try:
            out.append(read_bytes(source, limits))
        except ImageError as e:
            raise _located(e, _at(where, k)) from None
    return out


def decode_image(data: bytes, source: str, limits: ImageLimits, where: str = ""):
    """:func:`read_images`' bytes of ``source`` → an RGB PIL image; a refusal names ``where``."""
    try:
        return decode(data, source, limits)[0]
    except ImageError as e:
        raise _located(e, where) from None


def _at(where: Sequence[str], k: int) -> str:
    return where[k] if k < len(where) else ""


def _located(error: ImageError, where: str) -> ImageError:
    return ImageError(f"{where}: {error}") if where else error
