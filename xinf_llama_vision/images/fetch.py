"""The network part of the image loader: one bounded ``GET`` per hop, pinned to checked addresses,
done by urllib3 (as Xinference's own media loader does it).

Each hop (the URL, then each redirect) is resolved once and every address checked
(:func:`~.addresses.checked_addresses`); urllib3 then connects to a checked *address*, never
to a name: the pool's host is the address, the ``Host`` header, TLS SNI and the certificate check
use the URL's host name (``server_hostname`` / ``assert_hostname``), so DNS rebinding cannot slip
a private address in between. urllib3 follows no redirect (``redirect=False``) and retries nothing:
each ``Location`` is a new hop, checked the same way, at most ``max_redirects`` of them. No proxy
from the environment, no compressed transfer. The body is streamed under the byte cap.

urllib3's timeouts are per read, so a server that sends one byte just before each timeout would
never end; a deadline for the whole fetch (:class:`_Deadline`) shuts the sockets down when it
passes, which wakes a read blocked anywhere (status line, headers, TLS handshake, body).
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
import time
import urllib.parse
from typing import List, Optional, Tuple

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.ssl_match_hostname import CertificateError

from ..errors import ImageError
from .addresses import checked_addresses
from .limits import ImageLimits, hint
from .naming import describe

#: Redirect statuses that are followed (each hop re-checked).
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "xinf-llama-vision"
_CHUNK = 64 * 1024


def _resolve(host: str, port: int) -> List[str]:
    """Every address of ``host``: the loader's only name lookup (tests patch this seam).

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
            # The plain socket's shutdown (an SSLSocket's would drop its TLS state first); not
            # close(): that would not wake a blocked recv().
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


class _DeadlinePassed(Exception):
    pass


class _Pinned:
    """A urllib3 connection whose socket is :func:`_open_socket`'s, to the pool's host (a checked
    address), watched by the fetch's deadline."""

    def __init__(self, *args, guard: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        remaining = self._guard.remaining()
        if remaining <= 0:
            raise _DeadlinePassed()
        try:
            sock = _open_socket(self.host, self.port, min(self.timeout, remaining))
        except socket.timeout as e:  # as urllib3's own _new_conn reports them
            raise ConnectTimeoutError(self, f"connecting to {self.host} timed out") from e
        except OSError as e:
            raise NewConnectionError(self, f"cannot connect to {self.host}: {e}") from e
        self._guard.watch(sock)
        return sock


class _PinnedHTTP(_Pinned, HTTPConnection):
    pass


class _PinnedHTTPS(_Pinned, HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        # TLS took the plain socket's file descriptor over (that socket object is detached now):
        # the deadline must shut the TLS socket down to wake a read blocked inside it.
        self._guard.watch(self.sock)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PinnedHTTP


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPS


def _request_target(parts: urllib.parse.SplitResult) -> str:
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return path


def _host_header(host: str, port: int, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"


def _transport_error(e: BaseException, label: str, limits: ImageLimits, guard: _Deadline) -> ImageError:
    if guard.expired or isinstance(e, _DeadlinePassed):
        return ImageError(f"{label}: download took longer than the {limits.deadline:g}-second total limit; {hint('deadline')}")
    cause = e  # what urllib3 wrapped
    while isinstance(cause, HTTPError):
        inner = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ImageError(f"{label}: TLS certificate verification failed ({cause.verify_message or cause})")
    if isinstance(cause, CertificateError):  # urllib3's own host name check
        return ImageError(f"{label}: TLS certificate verification failed ({cause})")
    if isinstance(e, SSLError) or isinstance(cause, ssl.SSLError):
        return ImageError(f"{label}: TLS failed ({cause})")
    if isinstance(cause, TimeoutError) or (isinstance(cause, Urllib3Timeout) and not isinstance(cause, NewConnectionError)):
        return ImageError(f"{label}: the server did not answer within the {limits.timeout:g}-second timeout; {hint('timeout')}")
    return ImageError(f"{label}: download failed ({type(cause).__name__}: {cause})")


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
    addresses = checked_addresses(host, port, limits, label, _resolve)
    headers = {"Host": _host_header(host, port, scheme), "User-Agent": USER_AGENT, "Accept": "image/*",
               "Accept-Encoding": "identity"}
    timeout = urllib3.Timeout(connect=limits.timeout, read=limits.timeout)
    last: Optional[BaseException] = None
    for address in addresses:  # the first that takes the connection
        if scheme == "https":
            pool = _HTTPSPool(address, port, timeout=timeout, retries=False, ssl_context=_ssl_context(),
                              server_hostname=host, assert_hostname=host, guard=guard)
        else:
            pool = _HTTPPool(address, port, timeout=timeout, retries=False, guard=guard)
        try:
            response = pool.urlopen("GET", _request_target(parts), headers=headers, redirect=False, retries=False,
                                    assert_same_host=False, preload_content=False, decode_content=False,
                                    enforce_content_length=False)
        except (NewConnectionError, ConnectTimeoutError) as e:  # this address does not answer: the next one
            pool.close()
            last = e
            if guard.expired:
                break
            continue
        except (HTTPError, OSError, ValueError, _DeadlinePassed) as e:
            pool.close()
            raise _transport_error(e, label, limits, guard) from None
        try:
            return _answer(response, label, limits, guard)
        except ImageError:
            raise
        except (HTTPError, OSError, ValueError, _DeadlinePassed) as e:
            raise _transport_error(e, label, limits, guard) from None
        finally:
            response.release_conn()
            pool.close()
    raise _transport_error(last or OSError("no address to connect to"), label, limits, guard)


def _answer(response, label: str, limits: ImageLimits, guard: _Deadline) -> Tuple[Optional[str], bytes]:
    """A hop's response: where it redirects, or its body (under the byte cap)."""
    if guard.expired:
        raise _DeadlinePassed()
    if response.status in REDIRECTS:
        location = response.headers.get("Location")
        if not location:
            raise ImageError(f"{label}: HTTP {response.status} redirect without a Location header")
        return location.strip(), b""
    if response.status != 200:
        raise ImageError(f"{label}: the server answered HTTP {response.status} {response.reason or ''}".rstrip())
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise ImageError(f"{label}: compressed responses (Content-Encoding: {encoding}) are not accepted")
    declared = (response.headers.get("Content-Length") or "").strip()
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
    if declared.isdigit() and total < int(declared):  # the connection closed early
        raise ImageError(
            f"{label}: the server closed the connection after {total} bytes, before the declared "
            f"{int(declared)} (Content-Length)"
        )
    return None, b"".join(chunks)


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
