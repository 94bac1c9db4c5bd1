"""Image loading for every engine: ``data:`` URIs and http(s) URLs → fully decoded RGB PIL images.

Nothing is written to disk. Limits (env vars, read at call time; launch options override):

==============================  =======================  ==============================
``XLV_IMAGE_TIMEOUT``           10 (seconds)             connect and read timeout
``XLV_IMAGE_MAX_BYTES``         20 MiB                   stop reading past this
``XLV_IMAGE_MAX_PIXELS``        40 megapixels            decompression-bomb guard
``XLV_IMAGE_ALLOW_HOSTS``       (empty)                  hosts/networks exempt from the
                                                         private-address refusal
==============================  =======================  ==============================

Every refusal is an :class:`ImageError` (a :class:`~xinf_llama_vision.messages.RequestError`)
whose message names the image and the problem; the server answers it with a 4xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .messages import RequestError


class ImageError(RequestError):
    """An image that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class ImageLimits:
    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    allow_hosts: tuple = ()

    @classmethod
    def from_env(cls) -> "ImageLimits":
        env = os.environ
        return cls(
            timeout=float(env.get("XLV_IMAGE_TIMEOUT", cls.timeout)),
            max_bytes=int(env.get("XLV_IMAGE_MAX_BYTES", cls.max_bytes)),
            max_pixels=int(env.get("XLV_IMAGE_MAX_PIXELS", cls.max_pixels)),
            allow_hosts=tuple(h.strip() for h in env.get("XLV_IMAGE_ALLOW_HOSTS", "").split(",") if h.strip()),
        )


def describe(source: str) -> str:
    """A short, log-safe name for an image source.

    >>> describe("data:image/png;base64," + "A" * 100)
    'data:image/png;base64,… (100 base64 chars)'
    >>> describe("https://example.com/cat.png")
    'https://example.com/cat.png'
    """
    if source.startswith("data:"):
        head, _, payload = source.partition(",")
        return f"{head},… ({len(payload)} base64 chars)"
    return source if len(source) <= 200 else source[:200] + "…"


def decode_data_uri(source: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 ``data:`` URI.

    >>> decode_data_uri("data:image/png;base64,aGk=", ImageLimits())
    b'hi'
    >>> decode_data_uri("data:image/png,hi", ImageLimits())
    Traceback (most recent call last):
    ...
    xinf_llama_vision.images.ImageError: data:image/png,… (2 base64 chars): only base64 data URIs are supported (data:image/...;base64,...)
    """
    head, sep, payload = source.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ImageError(f"{describe(source)}: only base64 data URIs are supported (data:image/...;base64,...)")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(f"{describe(source)}: image is larger than the {limits.max_bytes}-byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{describe(source)}: invalid base64 payload") from None


def _host_allowed(host: str, addresses: List[str], limits: ImageLimits) -> bool:
    for allowed in limits.allow_hosts:
        if host == allowed:
            return True
        try:
            net = ipaddress.ip_network(allowed, strict=False)
        except ValueError:
            continue
        if any(ipaddress.ip_address(a) in net for a in addresses):
            return True
    return False


def check_address(url: str, limits: ImageLimits) -> None:
    """Refuse URLs whose host resolves to loopback, private, link-local or reserved addresses."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"{describe(url)}: cannot resolve host {host!r} ({e})") from None
    addresses = [info[4][0] for info in infos]
    if _host_allowed(host, addresses, limits):
        return
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if not ip.is_global or ip.is_multicast:
            raise ImageError(
                f"{describe(url)}: host {host!r} resolves to the non-public address {a}; "
                "the operator can allow it with XLV_IMAGE_ALLOW_HOSTS"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limits: ImageLimits):
        self.limits = limits

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise ImageError(f"{describe(req.full_url)}: redirect to a non-http(s) URL refused")
        check_address(newurl, self.limits)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, limits: ImageLimits) -> bytes:
    """Download an http(s) image, refusing private addresses and stopping past ``max_bytes``."""
    check_address(url, limits)
    opener = urllib.request.build_opener(_CheckedRedirects(limits), urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"User-Agent": "xinf-llama-vision"})
    try:
        with opener.open(request, timeout=limits.timeout) as response:
            data = response.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{describe(url)}: download failed with HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"{describe(url)}: download failed ({reason})") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"{describe(url)}: image is larger than the {limits.max_bytes}-byte limit")
    return data


def decode(data: bytes, source: str, limits: ImageLimits):
    """Fully decode image bytes into an RGB PIL image, refusing non-images and bombs."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"{describe(source)}: {width}x{height} pixels exceeds the {limits.max_pixels}-pixel limit"
                )
            probe.load()
            return probe.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{describe(source)}: not a readable image ({e})") from None


def load_image(source: str, limits: Optional[ImageLimits] = None):
    """One image source (``data:`` URI or http(s) URL) → RGB PIL image."""
    limits = limits or ImageLimits.from_env()
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme == "data":
        data = decode_data_uri(source, limits)
    elif scheme in ("http", "https"):
        data = fetch(source, limits)
    else:
        raise ImageError(
            f"{describe(source)}: unsupported image source; send a data: URI (base64) or an http(s) URL"
        )
    return decode(data, source, limits)


def load_images(sources: Sequence[str], limits: Optional[ImageLimits] = None) -> list:
    """Every source in order, as RGB PIL images."""
    limits = limits or ImageLimits.from_env()
    return [load_image(s, limits) for s in sources]
