"""The one image loader every engine uses: image sources → validated bytes → RGB PIL images.

Accepted sources:

* ``data:`` URIs with a base64 payload;
* ``http://`` and ``https://`` URLs whose host is a public address (or allow-listed by the
  operator), fetched with the standard library only: resolved once, checked, then connected to
  *that checked address* (the original name still goes in the ``Host`` header and TLS SNI /
  certificate check), so DNS rebinding cannot slip a private address in between; every redirect
  hop is checked the same way; no proxy from the environment is used;
* ``file://`` URLs and paths, only when the operator allowed one directory, and only for regular
  files whose resolved path (symlinks followed) stays inside it.

Everything else is refused. The bytes must be a PNG, JPEG (MPO), GIF, WebP or BMP image that
Pillow decodes completely (truncated or non-image bytes are refused); animated images give their
first frame. Nothing is written to disk.

Limits are :class:`ImageLimits`; each has an environment variable and a launch option
(:data:`KNOBS`, rendered for ``docs/security.md`` by :func:`knobs_table`). Every refusal is an :class:`ImageError`
(a :class:`~xinf_llama_vision.errors.RequestError`, answered with HTTP 400) whose message
names the image (:func:`describe`), the problem and, for limits, the knob that changes it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ImageError, RequestError
from .parsing import whole_number

MiB = 1024 * 1024

#: Pillow formats accepted (``Image.open(..., formats=FORMATS)``): what chat clients send.
#: Exotic formats are not even probed (EPS, for one, would run Ghostscript). Multi-picture
#: JPEGs from phones (MPO) open through the JPEG plugin.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

#: Redirect statuses that are followed (each hop re-checked).
REDIRECTS = (301, 302, 303, 307, 308)

USER_AGENT = "xinf-llama-vision"
_CHUNK = 64 * 1024


# -- knobs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    """One configurable limit: the :class:`ImageLimits` field, its launch option and env var."""

    field: str
    option: str
    env: str
    kind: str  # seconds | bytes | pixels | count | hosts | dir
    reason: str
    #: Xinference's own setting for the same limit (its media loader's), used when ours is unset.
    host_env: Optional[str] = None


KNOBS: Tuple[Knob, ...] = (
    Knob("timeout", "image_timeout", "XLV_IMAGE_TIMEOUT", "seconds",
         "Connect timeout, and the longest wait for any single read. A server that stops answering is dropped."),
    Knob("deadline", "image_deadline", "XLV_IMAGE_DEADLINE", "seconds",
         "Total time for one image, redirects included. Stops slow-drip servers that send a byte "
         "just before each read timeout.", "XINFERENCE_MEDIA_FETCH_TIMEOUT"),
    Knob("max_bytes", "image_max_bytes", "XLV_IMAGE_MAX_BYTES", "bytes",
         "Largest image (download, file or decoded data: URI). Reading stops past it; a larger "
         "Content-Length is refused before the body is read. Accepts KiB/MiB/GiB suffixes.",
         "XINFERENCE_MEDIA_MAX_BYTES"),
    Knob("max_pixels", "image_max_pixels", "XLV_IMAGE_MAX_PIXELS", "pixels",
         "Largest width x height, checked from the header before decoding (decompression bombs). "
         "At most Pillow's own limit (89478485)."),
    Knob("max_redirects", "image_max_redirects", "XLV_IMAGE_MAX_REDIRECTS", "count",
         "Redirects followed per image; each hop is re-checked. 0 refuses every redirect."),
    Knob("allow_hosts", "image_allow_hosts", "XLV_IMAGE_ALLOW_HOSTS", "hosts",
         "Comma-separated host names and IP addresses / CIDR networks exempt from the "
         "private-address refusal (e.g. `127.0.0.1, 10.0.0.0/8, images.internal`). A host name "
         "is trusted whatever it resolves to."),
    Knob("local_dir", "image_local_dir", "XLV_IMAGE_LOCAL_DIR", "dir",
         "A directory whose files may be sent as `file://` URLs or paths. Unset: local files are "
         "refused. Symlinks and `..` may not lead outside it."),
)
KNOB_BY_FIELD: Dict[str, Knob] = {k.field: k for k in KNOBS}


def hint(field: str) -> str:
    """How the operator changes a limit.

    >>> hint("max_bytes")
    'the operator can change it with the launch option image_max_bytes or the environment variable XLV_IMAGE_MAX_BYTES'
    """
    knob = KNOB_BY_FIELD[field]
    return f"the operator can change it with the launch option {knob.option} or the environment variable {knob.env}"


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": MiB, "gib": 1024**3}


def parse_size(value: Any, where: str = "size") -> int:
    """A positive byte count: an integer, or a string with an optional unit.

    >>> parse_size("20MiB"), parse_size("1.5 KiB"), parse_size("2MB"), parse_size(512), parse_size("1_000")
    (20971520, 1536, 2000000, 512, 1000)
    >>> parse_size("lots", "launch option image_max_bytes")
    Traceback (most recent call last):
    ...
    ValueError: launch option image_max_bytes must be a positive number of bytes (e.g. 20971520 or 20MiB), got 'lots'
    """
    error = ValueError(f"{where} must be a positive number of bytes (e.g. 20971520 or 20MiB), got {value!r}")
    if isinstance(value, bool):
        raise error
    if isinstance(value, int):
        number = value
    else:
        match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise error
        number = int(float(match.group(1).replace("_", "")) * _SIZE_UNITS[match.group(2).lower()])
    if number <= 0:
        raise error
    return number


def _parse_seconds(value: Any, where: str) -> float:
    error = ValueError(f"{where} must be a number of seconds > 0, got {value!r}")
    if isinstance(value, bool):
        raise error
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error from None
    if not math.isfinite(number) or number <= 0:
        raise error
    return number


def _parse_pixels(value: Any, where: str) -> int:
    from PIL import Image

    number = whole_number(value, where, 1, "a positive number of pixels")
    cap = Image.MAX_IMAGE_PIXELS
    if cap is not None and number > cap:
        raise ValueError(f"{where} must be at most {cap} (Pillow's decompression-bomb limit), got {value!r}")
    return number


_HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")


def normalize_host(host: str) -> str:
    """A host name as compared with the allow-list: lower case, no trailing dot, IDNA-encoded.

    >>> normalize_host("Images.Example.COM."), normalize_host("bücher.de")
    ('images.example.com', 'xn--bcher-kva.de')
    """
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def parse_allow_hosts(value: Any, where: str = "allow_hosts") -> Tuple[str, ...]:
    """Allow-list entries: host names (normalized) and networks (``a.b.c.d/n``, single IPs as /32 or /128).

    >>> parse_allow_hosts("127.0.0.1, 10.0.0.0/8 ,Images.Internal,::1")
    ('127.0.0.1/32', '10.0.0.0/8', 'images.internal', '::1/128')
    >>> parse_allow_hosts(["192.168.1.7/24"])
    ('192.168.1.0/24',)
    >>> parse_allow_hosts("")
    ()
    >>> parse_allow_hosts("http://x/", "XLV_IMAGE_ALLOW_HOSTS")
    Traceback (most recent call last):
    ...
    ValueError: XLV_IMAGE_ALLOW_HOSTS: 'http://x/' is neither a host name nor an IP address/network (write e.g. 127.0.0.1, 10.0.0.0/8, images.internal)
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ValueError(f"{where} must be a comma-separated string or a list of strings, got {value!r}")
    out: List[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            entry = str(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            entry = normalize_host(item)
            if not _HOSTNAME.fullmatch(entry):
                raise ValueError(
                    f"{where}: {item!r} is neither a host name nor an IP address/network "
                    "(write e.g. 127.0.0.1, 10.0.0.0/8, images.internal)"
                ) from None
        if entry not in out:
            out.append(entry)
    return tuple(out)


def _parse_dir(value: Any, where: str, must_exist: bool) -> Optional[str]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{where} must be a directory path, got {value!r}")
    path = Path(value).expanduser()
    if not must_exist:
        if not path.is_absolute():
            raise ValueError(f"{where} must be an absolute directory path, got {value!r}")
        return str(path)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ValueError(f"{where}: directory {str(value)!r} does not exist") from None
    if not resolved.is_dir():
        raise ValueError(f"{where}: {str(value)!r} is not a directory")
    return str(resolved)


def _parse(knob: Knob, value: Any, where: str, strict_dir: bool) -> Any:
    if knob.kind == "seconds":
        return _parse_seconds(value, where)
    if knob.kind == "bytes":
        return parse_size(value, where)
    if knob.kind == "pixels":
        return _parse_pixels(value, where)
    if knob.kind == "count":
        return whole_number(value, where, 0)
    if knob.kind == "hosts":
        return parse_allow_hosts(value, where)
    if knob.kind == "dir":
        return _parse_dir(value, where, strict_dir)
    raise AssertionError(knob.kind)


@dataclass(frozen=True)
class ImageLimits:
    """What the loader accepts. A plain dict round-trips: ``ImageLimits(**limits.to_dict())``."""

    timeout: float = 10.0
    deadline: float = 30.0
    max_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    max_redirects: int = 3
    allow_hosts: Tuple[str, ...] = ()
    local_dir: Optional[str] = None

    def __post_init__(self):
        for knob in KNOBS:
            value = _parse(knob, getattr(self, knob.field), f"ImageLimits.{knob.field}", strict_dir=False)
            object.__setattr__(self, knob.field, value)

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None) -> "ImageLimits":
        """Defaults, overridden by Xinference's ``XINFERENCE_MEDIA_*`` setting for the same limit where
        there is one, by our environment variables, then by launch options in ``config``.

        Raises :class:`ValueError` naming the launch option or environment variable that is wrong.

        >>> ImageLimits.from_config({"image_max_bytes": "1MiB", "image_allow_hosts": "127.0.0.1"}).max_bytes
        1048576
        """
        values: Dict[str, Any] = {}
        for knob in KNOBS:
            if config is not None and config.get(knob.option) is not None:
                raw, where = config[knob.option], f"launch option {knob.option}"
            elif os.environ.get(knob.env, "").strip():
                raw, where = os.environ[knob.env], f"environment variable {knob.env}"
            elif knob.host_env and os.environ.get(knob.host_env, "").strip():
                raw, where = os.environ[knob.host_env], f"environment variable {knob.host_env}"
            else:
                continue
            values[knob.field] = _parse(knob, raw, where, strict_dir=True)
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (lists, not tuples).

        >>> ImageLimits(allow_hosts=("10.0.0.0/8",)).to_dict()["allow_hosts"]
        ['10.0.0.0/8']
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["allow_hosts"] = list(self.allow_hosts)
        return out


def _default_text(knob: Knob) -> str:
    default = {f.name: f.default for f in fields(ImageLimits)}[knob.field]
    if knob.kind == "seconds":
        return f"{default:g} s"
    if knob.kind == "bytes":
        return f"{default} ({default / MiB:g} MiB)" if default % (MiB // 4) == 0 else str(default)
    if knob.kind == "pixels":
        return f"{default} ({default / 1e6:g} megapixels)"
    if knob.kind == "hosts":
        return "(empty)" if not default else ", ".join(default)
    if knob.kind == "dir":
        return "(unset: local files refused)" if default is None else str(default)
    return str(default)


def knobs_table() -> str:
    """The Markdown table of every knob, as ``docs/security.md`` shows it."""
    rows = [
        "| Launch option | Environment variable | Default | What it does |",
        "|---|---|---|---|",
    ]
    for knob in KNOBS:
        env = f"`{knob.env}`" + (f" (else Xinference's `{knob.host_env}`)" if knob.host_env else "")
        rows.append(f"| `{knob.option}` | {env} | {_default_text(knob)} | {knob.reason} |")
    return "\n".join(rows) + "\n"


# -- naming images in messages -------------------------------------------------------------


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


# -- data: URIs ----------------------------------------------------------------------------


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


# -- addresses -----------------------------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def address_refusal(address: Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]) -> Optional[str]:
    """Why an address is not fetched from by default, or ``None`` for a public unicast address.

    IPv6 addresses that embed an IPv4 one (IPv4-mapped, 6to4, NAT64) are judged by it too.

    >>> address_refusal("93.184.215.14") is None, address_refusal("2606:4700:4700::1111") is None
    (True, True)
    >>> [address_refusal(a) for a in ("127.0.0.1", "169.254.169.254", "10.1.2.3", "0.0.0.0", "224.0.0.1")]
    ['loopback', 'link-local', 'private', 'unspecified', 'multicast']
    >>> [address_refusal(a) for a in ("::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "2002:a9fe:a9fe::1")]
    ['loopback', 'link-local', 'private', 'loopback (IPv4-mapped 127.0.0.1)', 'link-local (6to4 169.254.169.254)']
    >>> address_refusal("100.64.0.1"), address_refusal("240.0.0.1")
    ('not globally routable', 'reserved')
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip.version == 6:
        embedded = [("IPv4-mapped", ip.ipv4_mapped), ("6to4", ip.sixtofour)]
        if ip in _NAT64:
            embedded.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if ip.teredo:
            embedded.append(("Teredo", ip.teredo[1]))
        for label, inner in embedded:
            if inner is not None:
                why = address_refusal(inner)
                if why is not None:
                    return f"{why} ({label} {inner})"
        if ip in _NAT64_LOCAL:
            return "private (local-use NAT64)"
        if ip.ipv4_mapped is not None:
            return None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


@functools.lru_cache(maxsize=256)
def _network(entry: str):
    return ipaddress.ip_network(entry)


def host_allowed(host: str, address: str, limits: ImageLimits) -> bool:
    """Whether the operator's allow-list covers this host name or address.

    >>> limits = ImageLimits(allow_hosts=("127.0.0.1/32", "images.internal"))
    >>> host_allowed("x.test", "127.0.0.1", limits), host_allowed("x.test", "::ffff:127.0.0.1", limits)
    (True, True)
    >>> host_allowed("Images.Internal.", "10.9.9.9", limits), host_allowed("x.test", "127.0.0.2", limits)
    (True, False)
    """
    name = normalize_host(host)
    ip = ipaddress.ip_address(address)
    candidates = [ip] + ([ip.ipv4_mapped] if ip.version == 6 and ip.ipv4_mapped else [])
    for entry in limits.allow_hosts:
        if "/" in entry:
            net = _network(entry)
            if any(c.version == net.version and c in net for c in candidates):
                return True
        elif entry == name:
            return True
    return False


def _resolve(host: str, port: int) -> List[str]:
    """Every address of ``host``: the module's only name lookup (tests patch this seam).

    Called once per hop; the addresses it returns are the ones checked *and* connected to.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: List[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to a numeric, already-checked address (no name lookup happens here)."""
    return socket.create_connection((address, port), timeout=timeout)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """The TLS context for https fetches: system CAs, certificate and host name verified."""
    return ssl.create_default_context()


def checked_addresses(host: str, port: int, limits: ImageLimits, label: str) -> List[str]:
    """Resolve ``host`` once and return its addresses, refusing the host if any is not allowed."""
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = _resolve(host, port)
        except (OSError, UnicodeError, ValueError) as e:
            raise ImageError(f"{label}: cannot resolve host {host!r} ({e})") from None
    if not addresses:
        raise ImageError(f"{label}: host {host!r} has no IPv4/IPv6 address")
    for address in addresses:
        try:
            why = address_refusal(address)
        except ValueError:
            why = "not an IP address"
        if why is not None and not host_allowed(host, address, limits):
            shown = f"host {host!r} resolves to" if address != host else "host"
            raise ImageError(
                f"{label}: {shown} the {why} address {address}, which is not fetched from "
                f"(server-side request forgery guard); the operator can allow it with the launch "
                f"option image_allow_hosts or the environment variable XLV_IMAGE_ALLOW_HOSTS"
            )
    return addresses


# -- http(s) -------------------------------------------------------------------------------


class _Deadline:
    """A wall-clock limit for a whole fetch: when it passes, every socket in use is shut down,
    which wakes any blocked read (headers, body or TLS handshake) at once."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to a fixed, already-checked address; ``Host`` stays the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float, guard: _Deadline):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._guard = guard

    def _tcp(self) -> socket.socket:
        remaining = self._guard.remaining()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock = _open_socket(self._address, self.port, min(self.timeout, remaining))
        self._guard.watch(sock)
        sock.settimeout(self.timeout)
        return sock

    def connect(self):
        self.sock = self._tcp()


class _PinnedTLSConnection(_PinnedConnection):
    """HTTPS to a fixed address; SNI and the certificate check use the URL's host name."""

    default_port = 443

    def connect(self):
        sock = self._tcp()
        try:
            self.sock = _ssl_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self._guard.watch(self.sock)


def _request_target(parts: urllib.parse.SplitResult) -> str:
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return path


def _transport_error(e: BaseException, label: str, limits: ImageLimits, guard: _Deadline) -> ImageError:
    if guard.expired or isinstance(e, _DeadlinePassed):
        return ImageError(f"{label}: download took longer than the {limits.deadline:g}-second total limit; {hint('deadline')}")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return ImageError(f"{label}: the server did not answer within the {limits.timeout:g}-second timeout; {hint('timeout')}")
    if isinstance(e, ssl.SSLCertVerificationError):
        return ImageError(f"{label}: TLS certificate verification failed ({e.verify_message or e})")
    if isinstance(e, http.client.IncompleteRead):
        return ImageError(f"{label}: the server closed the connection after {len(e.partial)} bytes, before the end of the body")
    return ImageError(f"{label}: download failed ({type(e).__name__}: {e})")


class _DeadlinePassed(Exception):
    pass


def _hop(url: str, label: str, limits: ImageLimits, guard: _Deadline) -> Tuple[Optional[str], bytes]:
    """One request: ``(redirect location, b"")`` or ``(None, body)``."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageError(f"{label}: malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not host:
        raise ImageError(f"{label}: URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ImageError(f"{label}: credentials in image URLs are not supported")
    port = port or (443 if scheme == "https" else 80)
    addresses = checked_addresses(host, port, limits, label)
    cls = _PinnedTLSConnection if scheme == "https" else _PinnedConnection
    conn = None
    try:
        last: Optional[BaseException] = None
        for address in addresses:
            candidate = cls(host, port, address, limits.timeout, guard)
            try:
                candidate.connect()
            except (OSError, ValueError) as e:
                candidate.close()
                last = e
                if guard.expired or isinstance(e, ssl.SSLError):
                    break
                continue
            conn = candidate
            break
        if conn is None:
            raise last or OSError("no address to connect to")
        conn.request("GET", _request_target(parts), headers={
            "User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity",
        })
        response = conn.getresponse()
        if guard.expired:
            raise _DeadlinePassed()
        if response.status in REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise ImageError(f"{label}: HTTP {response.status} redirect without a Location header")
            return location.strip(), b""
        if response.status != 200:
            raise ImageError(f"{label}: the server answered HTTP {response.status} {response.reason}".rstrip())
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise ImageError(f"{label}: compressed responses (Content-Encoding: {encoding}) are not accepted")
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > limits.max_bytes:
            raise ImageError(
                f"{label}: the server declares {int(declared)} bytes (Content-Length), over the "
                f"{limits.max_bytes}-byte limit; {hint('max_bytes')}"
            )
        chunks: List[bytes] = []
        total = 0
        while True:
            chunk = response.read1(_CHUNK)
            if guard.expired:
                raise _DeadlinePassed()
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_bytes:
                raise ImageError(
                    f"{label}: download passed the {limits.max_bytes}-byte limit, stopped reading; {hint('max_bytes')}"
                )
            chunks.append(chunk)
        if guard.expired:
            raise _DeadlinePassed()
        if declared.isdigit() and total < int(declared):  # read1 ends quietly on an early close
            raise ImageError(
                f"{label}: the server closed the connection after {total} bytes, before the declared "
                f"{int(declared)} (Content-Length)"
            )
        return None, b"".join(chunks)
    except ImageError:
        raise
    except (OSError, ValueError, http.client.HTTPException, _DeadlinePassed) as e:
        raise _transport_error(e, label, limits, guard) from None
    finally:
        if conn is not None:
            conn.close()


def fetch(url: str, limits: ImageLimits) -> bytes:
    """Download an http(s) image: every hop's address checked and pinned, limits enforced."""
    label = describe(url)
    guard = _Deadline(limits.deadline)
    try:
        current = url
        for hop in range(limits.max_redirects + 1):
            where = label if hop == 0 else f"{label} (redirected to {describe(current)})"
            location, data = _hop(current, where, limits, guard)
            if location is None:
                if not data:
                    raise ImageError(f"{where}: empty response body")
                return data
            try:
                target = urllib.parse.urljoin(current, location)
                scheme = urllib.parse.urlsplit(target).scheme.lower()
            except ValueError:
                raise ImageError(f"{where}: malformed redirect Location {describe(location)}") from None
            if scheme not in ("http", "https"):
                raise ImageError(f"{where}: redirect to a non-http(s) URL ({describe(target)}) refused")
            current = target
        raise ImageError(
            f"{label}: more than {limits.max_redirects} redirects (image_max_redirects); {hint('max_redirects')}"
        )
    finally:
        guard.cancel()


# -- local files ---------------------------------------------------------------------------


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


# -- decoding ------------------------------------------------------------------------------


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


def decode(data: bytes, source: str, limits: ImageLimits):
    """Image bytes → ``(RGB PIL image, Pillow format)``; the first frame fully decoded.

    The size from the header is checked against ``max_pixels`` before any pixel is decoded.
    Transparent images are composited on white (as the Hugging Face processor does).
    """
    from PIL import Image

    label = describe(source)
    too_many = f"over the {limits.max_pixels}-pixel limit (decompression-bomb guard); {hint('max_pixels')}"
    Image.init()  # registers every plugin once, so FORMATS can be named (WEBP)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Only raised by Pillow past its own limit (>= ours); a warning only when warnings are errors.
        raise ImageError(f"{label}: image is {_pillow_size(e)}{too_many}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{label}: not an image in an accepted format ({', '.join(FORMATS)}), or its header is cut off"
        ) from None
    except Exception as e:  # any failure on hostile bytes is the request's problem, not a 500
        raise ImageError(f"{label}: not a readable image ({type(e).__name__}: {e})") from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(f"{label}: image is {width}x{height} = {width * height} pixels, {too_many}")
        try:
            image.load()  # the first frame, completely: truncated data raises here
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                rgb = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb.alpha_composite(rgba)
                rgb = rgb.convert("RGB")
            else:
                rgb = image.convert("RGB")
        except Exception as e:
            raise ImageError(f"{label}: not a readable image, decoding failed ({type(e).__name__}: {e})") from None
        return rgb, image.format


def _pillow_size(e: BaseException) -> str:
    match = re.search(r"\((\d+) pixels\)", str(e))
    return f"{match.group(1)} pixels, " if match else ""


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}


def load_image(source: str, limits: Optional[ImageLimits] = None):
    """One image source → a fully decoded RGB PIL image, or :class:`ImageError`."""
    limits = limits if limits is not None else ImageLimits.from_config(None)
    image, _ = decode(read_bytes(source, limits), source, limits)
    return image


def load_images(sources: Sequence[str], limits: ImageLimits, where: Sequence[str] = ()) -> list:
    """Every source in order, as RGB PIL images; a refusal names where the image was in the request
    (``where``, e.g. ``messages[0].content[1]: …``)."""
    images = []
    for k, source in enumerate(sources):
        try:
            images.append(load_image(source, limits))
        except ImageError as e:
            if k >= len(where):
                raise
            raise ImageError(f"{where[k]}: {e}") from None
    return images
