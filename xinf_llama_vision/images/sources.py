"""Image sources that are not the network: base64 ``data:`` URIs, and files in the operator's directory.

Local files are refused unless the operator allowed one directory, and then only regular files
whose resolved path (symlinks followed, ``..`` resolved) stays inside it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import urllib.parse
from pathlib import Path

from ..errors import ImageError
from .limits import ImageLimits, hint
from .naming import describe


def decode_data_uri(source: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 ``data:`` URI (whitespace, URL-safe alphabet and missing padding tolerated).

    >>> decode_data_uri("data:image/png;base64,aGk=", ImageLimits())
    b'hi'
    >>> decode_data_uri("data:;base64,aG\\nk", ImageLimits())
    b'hi'
    >>> decode_data_uri("data:image/png,hi", ImageLimits())
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.ImageError: data:image/png,… (2 base64 chars): only base64 data URIs are supported (data:image/...;base64,...)
    >>> decode_data_uri("data:image/png;base64,aGk=", ImageLimits(max_bytes=1))
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.ImageError: data:image/png;base64,… (4 base64 chars): image is 2 bytes, over the 1-byte limit; the operator can change it with the launch option image_max_bytes or the environment variable XLV_IMAGE_MAX_BYTES
    """
    label = describe(source)
    head, sep, payload = source.partition(",")
    params = [p.strip().lower() for p in head[5:].split(";")]
    if not sep or params[-1] != "base64":
        raise ImageError(f"{label}: only base64 data URIs are supported (data:image/...;base64,...)")
    # 4 base64 chars carry 3 bytes: refuse from the length alone before decoding anything
    # (twice the size allows for line breaks; the exact check follows).
    if len(payload) > 2 * (4 * (limits.max_bytes // 3) + 8):
        raise ImageError(
            f"{label}: image is over the {limits.max_bytes}-byte limit "
            f"(about {len(payload) * 3 // 4} bytes); {hint('max_bytes')}"
        )
    compact = "".join(payload.split()).rstrip("=")
    if len(compact) * 3 // 4 > limits.max_bytes:
        raise ImageError(
            f"{label}: image is {len(compact) * 3 // 4} bytes, over the {limits.max_bytes}-byte limit; {hint('max_bytes')}"
        )
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label}: invalid base64 payload") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"{label}: image is {len(data)} bytes, over the {limits.max_bytes}-byte limit; {hint('max_bytes')}")
    if not data:
        raise ImageError(f"{label}: empty image")
    return data


def read_local(source: str, limits: ImageLimits) -> bytes:
    """A ``file://`` URL or path inside the operator's directory (resolved: no ``..``/symlink escapes)."""
    label = describe(source)
    if not limits.local_dir:
        raise ImageError(
            f"{label}: local files are not served; send a data: URI (base64) or an http(s) URL "
            "(the operator can allow one directory with the launch option image_local_dir or the "
            "environment variable XLV_IMAGE_LOCAL_DIR)"
        )
    if source[:5].lower() == "file:":
        parts = urllib.parse.urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"{label}: file URLs must name a local file (file:///path), not host {parts.netloc!r}")
        path = urllib.parse.unquote(parts.path)
    else:
        path = source
    if "\x00" in path or not path:
        raise ImageError(f"{label}: invalid file path")
    try:
        root = Path(limits.local_dir).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageError(f"{label}: the local image directory (image_local_dir) does not exist on this server") from None
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    outside = ImageError(f"{label}: outside the allowed local image directory (image_local_dir); {hint('local_dir')}")
    try:
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError):
        raise outside from None
    if not real.is_relative_to(root):
        raise outside
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file in the local image directory") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot open the file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{label}: not a regular file")
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc) and not Path(os.readlink(proc)).is_relative_to(root):
            raise outside  # the path changed under us (symlink swapped in after the check)
        if st.st_size > limits.max_bytes:
            raise ImageError(f"{label}: file is {st.st_size} bytes, over the {limits.max_bytes}-byte limit; {hint('max_bytes')}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limits.max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise ImageError(f"{label}: file is over the {limits.max_bytes}-byte limit; {hint('max_bytes')}")
    return data
