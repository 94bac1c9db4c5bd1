"""The image loader against hostile and faulty sources (no Xinference server needed).

A real HTTP server runs in a thread on 127.0.0.1. Safety net for every test: the loader's name
lookup (``images.fetch._resolve``) answers only from a table the test sets, and its socket opener
(``images.fetch._open_socket``) connects to loopback only and records every attempt, so no test can
send traffic anywhere else.
"""

from __future__ import annotations

import base64
import builtins
import doctest
import io
import ipaddress
import json
import os
import socket
import struct
import tempfile
import threading
import time
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image, ImageFile

from xinf_llama_vision.images import addresses, decode, fetch as image_fetch, limits, load, naming, sources
from xinf_llama_vision.errors import ImageError, RequestError
from xinf_llama_vision.images import ImageLimits, load_image, load_images
from xinf_llama_vision.images.limits import KNOBS
from xinf_llama_vision.images.naming import describe

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ("127.0.0.1", "::1")
ALLOW_LOCAL = ImageLimits(allow_hosts=("127.0.0.1",))


# -- images made here ----------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


RED = (200, 30, 40)
GOOD = encode(Image.new("RGB", (8, 6), RED))
JPEG = encode(Image.new("RGB", (16, 16), (10, 120, 250)), "JPEG", quality=95)


def noisy_png(side=64) -> bytes:
    return encode(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))


TRUNCATED = noisy_png()[:-2000]  # cut in the middle of the pixel data


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG whose header claims ``width`` x ``height`` but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- safety net and the local server -------------------------------------------------------


class Net:
    """What the loader resolved and connected to during one test."""

    def __init__(self):
        self.names = {}  # host -> list of addresses, or a callable returning one
        self.lookups = []
        self.connects = []


@pytest.fixture(autouse=True)
def net(monkeypatch):
    n = Net()
    real_open = image_fetch._open_socket

    def resolve(host, port):
        n.lookups.append(host)
        answer = n.names.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host (test resolver)")
        return list(answer() if callable(answer) else answer)

    def open_socket(address, port, timeout):
        n.connects.append((address, port))
        if address not in LOCAL:
            raise ConnectionRefusedError("test safety net: only loopback may be connected to")
        return real_open(address, port, timeout)

    monkeypatch.setattr(image_fetch, "_resolve", resolve)
    monkeypatch.setattr(image_fetch, "_open_socket", open_socket)
    for knob in KNOBS:
        monkeypatch.delenv(knob.env, raising=False)
    return n


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def send(self, body: bytes, status=200, length=None, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if length is not False:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.hits.append((self.path, self.headers.get("Host")))
        path = urlsplit(self.path).path
        query = parse_qs(urlsplit(self.path).query)
        stop = srv.stop
        if path == "/good.png":
            self.send(GOOD)
        elif path == "/photo.jpg":
            self.send(JPEG, headers=[("Content-Type", "image/jpeg")])
        elif path == "/huge":  # no Content-Length, 4 MiB of zeros (bounded)
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                if stop.is_set():
                    break
                self.wfile.write(b"\0" * 65536)
        elif path == "/declares-huge":
            self.send(b"\0" * 10, length=50_000_000)
        elif path == "/lying-short":  # says 300 bytes, sends a whole PNG: only 300 are read
            self.send(noisy_png(), length=300)
        elif path == "/lying-long":  # says 100000 bytes, sends a small PNG and closes
            self.send(GOOD, length=100_000)
        elif path == "/drip":  # a byte every 50 ms: never a read timeout, bounded at 200 bytes
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(200):
                if stop.wait(0.05):
                    break
                self.wfile.write(b"\0")
                self.wfile.flush()
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            for _ in range(200):
                if stop.wait(0.05):
                    break
                self.wfile.write(b"a")
                self.wfile.flush()
        elif path == "/stall":
            stop.wait(3)
        elif path == "/redirect":
            self.send(b"", status=302, headers=[("Location", query["to"][0])])
        elif path == "/loop":
            self.send(b"", status=302, headers=[("Location", "/loop")])
        elif path == "/not-image":
            self.send(b"<html>hello, not an image</html>")
        elif path == "/truncated.png":
            self.send(TRUNCATED)
        elif path == "/bomb.png":
            self.send(png_header_only(20_000, 20_000))
        elif path == "/gzip":
            self.send(GOOD, headers=[("Content-Encoding", "gzip")])
        else:
            self.send(b"no", status=404)


def start_server(wrap=None):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hits, server.lock, server.stop = [], threading.Lock(), threading.Event()
    if wrap:
        server.socket = wrap(server.socket)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def stop_server(server, thread):
    server.stop.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def http_server():
    server, thread = start_server()
    yield server
    stop_server(server, thread)


@pytest.fixture
def srv(http_server):
    """The module's server with a fresh request log; ``srv.url(path)`` on 127.0.0.1."""
    http_server.hits.clear()
    port = http_server.server_address[1]
    http_server.port = port
    http_server.url = lambda path, host="127.0.0.1": f"http://{host}:{port}{path}"
    return http_server


def refused(source, limits=None, *fragments):
    with pytest.raises(ImageError) as info:
        load_image(source, limits or ImageLimits())
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- data: URIs and decoding ---------------------------------------------------------------


def test_good_data_uri_decodes_to_rgb_with_its_pixels():
    image = load_image(data_uri(GOOD))
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((3, 2)) == RED


def test_refusals_are_request_errors_so_the_server_answers_400():
    assert issubclass(ImageError, RequestError)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"<html>hello, not an image</html>", "not an image in an accepted format"),
        (TRUNCATED, "decoding failed"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), "not an image in an accepted format"),
        (GOOD[:30], "or its header is cut off"),
    ],
    ids=["text", "truncated-png", "tiff-not-accepted", "header-cut"],
)
def test_non_images_and_truncated_images_are_refused(data, fragment):
    refused(data_uri(data), None, fragment, "data:image/png;base64,…")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_data_uri_must_be_base64_and_valid():
    refused("data:image/png,rawbytes", None, "only base64 data URIs")
    refused("data:image/png;base64,@@@@", None, "invalid base64")


def test_data_uri_tolerates_line_breaks_and_urlsafe_alphabet():
    raw = base64.b64encode(GOOD).decode()
    wrapped = "\n".join(raw[i:i + 20] for i in range(0, len(raw), 20))
    assert load_image("data:image/png;base64," + wrapped).getpixel((0, 0)) == RED
    urlsafe = base64.urlsafe_b64encode(GOOD).decode().rstrip("=")
    assert load_image("data:image/png;base64," + urlsafe).getpixel((0, 0)) == RED


def test_a_refusal_never_dumps_a_data_uri():
    payload = base64.b64encode(b"x" * 30_000).decode()
    message = refused("data:image/png;base64," + payload, None, f"({len(payload)} base64 chars)")
    assert payload[:50] not in message and len(message) < 400


def test_decompression_bomb_header_is_refused_before_decoding():
    # 7000 x 7000 = 49 M pixels: over our 40 M default, under Pillow's own limits.
    refused(data_uri(png_header_only(7000, 7000)), None,
            "7000x7000 = 49000000 pixels", "40000000-pixel limit", "image_max_pixels", "XLV_IMAGE_MAX_PIXELS")


def test_pillow_bomb_error_and_warning_become_image_errors():
    # 20000^2 = 400 M: past Pillow's hard limit (it raises DecompressionBombError).
    refused(data_uri(png_header_only(20_000, 20_000)), None, "400000000 pixels", "pixel limit")
    # 10000^2 = 100 M: Pillow only warns; with warnings turned into errors it must still be a 400.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused(data_uri(png_header_only(10_000, 10_000)), None, "pixel limit", "image_max_pixels")


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(0, 200, 0), (0, 0, 200), (200, 200, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(data_uri(buf.getvalue(), "image/gif"))
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (0, 200, 0)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((1, 1), (10, 20, 30, 255))
    out = load_image(data_uri(encode(image)))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 20, 30)


def test_load_images_keeps_order():
    blue = encode(Image.new("RGB", (2, 2), (0, 0, 255)))
    out = load_images([data_uri(GOOD), data_uri(blue)], ImageLimits())
    assert [i.getpixel((0, 0)) for i in out] == [RED, (0, 0, 255)]


# -- sources that are not data: or http(s) -------------------------------------------------


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("ftp://example.com/cat.png", "unsupported image source (scheme 'ftp')"),
        ("gopher://127.0.0.1:70/", "unsupported image source (scheme 'gopher')"),
        ("file:///etc/passwd", "local files are not served"),
        ("/etc/passwd", "local files are not served"),
        ("cat.png", "local files are not served"),
    ],
)
def test_other_sources_are_refused_by_default(source, fragment, net):
    message = refused(source, None, fragment)
    if "local" in fragment:
        assert "image_local_dir" in message and "XLV_IMAGE_LOCAL_DIR" in message
    assert net.connects == []


@pytest.fixture
def local_dir(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "good.png").write_bytes(GOOD)
    (root / "sub" / "inner.png").write_bytes(GOOD)
    (tmp_path / "secret.png").write_bytes(GOOD)  # a real image outside the directory
    return root


def test_local_dir_serves_files_inside_it(local_dir):
    limits = ImageLimits(local_dir=str(local_dir))
    for source in (f"file://{local_dir}/good.png", str(local_dir / "sub" / "inner.png"), "sub/inner.png",
                   f"file://localhost{local_dir}/sub/../good.png"):
        assert load_image(source, limits).getpixel((0, 0)) == RED, source


def test_local_dir_refuses_dotdot_and_symlink_escapes(local_dir, tmp_path):
    limits = ImageLimits(local_dir=str(local_dir))
    (local_dir / "link.png").symlink_to(tmp_path / "secret.png")
    (local_dir / "linkdir").symlink_to(tmp_path)
    (local_dir / "inside-link.png").symlink_to(local_dir / "good.png")
    for source in (f"file://{local_dir}/../secret.png", f"{local_dir}/sub/../../secret.png", "../secret.png",
                   f"file://{local_dir}/link.png", str(local_dir / "linkdir" / "secret.png"),
                   str(tmp_path / "secret.png")):
        refused(source, limits, "outside the allowed local image directory", "image_local_dir")
    # a symlink that stays inside is fine
    assert load_image(str(local_dir / "inside-link.png"), limits).getpixel((0, 0)) == RED


def test_local_dir_refuses_missing_non_regular_and_remote_file_urls(local_dir):
    limits = ImageLimits(local_dir=str(local_dir))
    refused("nothing.png", limits, "no such file")
    refused(str(local_dir / "sub"), limits, "not a regular file")
    os.mkfifo(local_dir / "fifo")
    started = time.monotonic()
    refused(str(local_dir / "fifo"), limits, "not a regular file")  # and does not block on the FIFO
    assert time.monotonic() - started < 2
    refused("file://fileserver/share/x.png", limits, "must name a local file")
    refused("ftp://x/y.png", limits, "scheme 'ftp'")


# -- http(s) -------------------------------------------------------------------------------


def test_loopback_is_refused_by_default_and_never_contacted(srv, net):
    refused(srv.url("/good.png"), None, "loopback address 127.0.0.1", "image_allow_hosts", "XLV_IMAGE_ALLOW_HOSTS")
    assert srv.hits == [] and net.connects == []


def test_good_image_is_fetched_when_loopback_is_allow_listed(srv):
    image = load_image(srv.url("/good.png"), ALLOW_LOCAL)
    assert image.getpixel((0, 0)) == RED
    assert srv.hits == [("/good.png", f"127.0.0.1:{srv.port}")]


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"),
        ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("100.64.0.1", "not globally routable"),
        ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"), ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"),
        ("fd12::1", "private"), ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback (IPv4-mapped"),
        ("::ffff:169.254.169.254", "link-local (IPv4-mapped"), ("2002:0a00:0001::1", "private (6to4"),
        ("2001:db8::1", "private"),
    ],
)
def test_non_public_addresses_are_refused_before_connecting(address, why, net):
    assert addresses.address_refusal(address).startswith(why)
    host = f"[{address}]" if ":" in address else address
    refused(f"http://{host}:8080/x.png", None, f"{why}", address)
    net.names["name.test"] = [address]
    refused("https://name.test/x.png", None, f"host 'name.test' resolves to the {why}", address)
    assert net.connects == []


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass_the_check(address):
    assert ipaddress.ip_address(address).is_global
    assert addresses.address_refusal(address) is None


def test_one_bad_address_among_several_refuses_the_host(net):
    net.names["mixed.test"] = ["93.184.215.14", "10.0.0.7"]
    refused("http://mixed.test/a.png", None, "private address 10.0.0.7")
    assert net.connects == []


def test_dns_rebinding_connects_only_to_the_checked_address(srv, net, monkeypatch):
    """First answer public, every later answer 127.0.0.1 (where our server listens)."""
    public = "93.184.215.14"
    answers = iter([[public]])
    net.names["rebind.test"] = lambda: next(answers, ["127.0.0.1"])
    # Any other lookup path (a second resolution by the HTTP client) gets the rebound answer too.
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "rebind.test":
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    refused(f"http://rebind.test:{srv.port}/good.png", None, "download failed")
    assert net.lookups == ["rebind.test"]  # resolved once
    assert net.connects == [(public, srv.port)]  # and connected to what was checked (refused by the net)
    assert srv.hits == []  # nothing reached the local server


def test_pinned_connection_sends_the_original_host_header(srv, net):
    answers = iter([["127.0.0.1"]])
    net.names["img.test"] = lambda: next(answers, ["10.0.0.1"])
    image = load_image(f"http://img.test:{srv.port}/good.png", ALLOW_LOCAL)
    assert image.getpixel((0, 0)) == RED
    assert srv.hits == [("/good.png", f"img.test:{srv.port}")]
    assert net.lookups == ["img.test"] and net.connects == [("127.0.0.1", srv.port)]


@pytest.fixture
def img_host(net):
    """``img.test`` → 127.0.0.1, allow-listed by name only (127.0.0.1 itself is not)."""
    net.names["img.test"] = ["127.0.0.1"]
    return ImageLimits(allow_hosts=("img.test",))


def test_redirect_to_an_allowed_host_is_followed(srv, img_host):
    url = f"http://img.test:{srv.port}/redirect?to=/good.png"
    assert load_image(url, img_host).getpixel((0, 0)) == RED
    assert [h[0] for h in srv.hits] == ["/redirect?to=/good.png", "/good.png"]


@pytest.mark.parametrize(
    "target, fragments",
    [
        ("http://127.0.0.1:{port}/good.png", ["redirected to http://127.0.0.1", "loopback address 127.0.0.1"]),
        ("http://169.254.169.254/latest/meta-data/", ["link-local address 169.254.169.254"]),
        ("http://[::ffff:127.0.0.1]:{port}/good.png", ["IPv4-mapped"]),
        ("http://evil.test:{port}/good.png", ["host 'evil.test' resolves to the loopback address 127.0.0.1"]),
        ("file:///etc/passwd", ["redirect to a non-http(s) URL (file:///etc/passwd) refused"]),
        ("ftp://example.com/x.png", ["non-http(s)"]),
    ],
    ids=["loopback", "metadata", "mapped", "other-name", "file", "ftp"],
)
def test_every_redirect_hop_is_checked(srv, img_host, net, target, fragments):
    net.names["evil.test"] = ["127.0.0.1"]
    target = target.format(port=srv.port)
    refused(f"http://img.test:{srv.port}/redirect?to={target}", img_host, *fragments)
    assert len(srv.hits) == 1  # only the first hop reached the server
    assert all(address in LOCAL for address, _ in net.connects) and len(net.connects) == 1


def test_redirects_are_capped(srv):
    refused(srv.url("/loop"), ALLOW_LOCAL, "more than 3 redirects", "XLV_IMAGE_MAX_REDIRECTS")
    assert len(srv.hits) == 4


@pytest.mark.parametrize(
    "path, limits, fragments",
    [
        ("/huge", ImageLimits(allow_hosts=("127.0.0.1",), max_bytes=100_000),
         ["passed the 100000-byte limit, stopped reading", "image_max_bytes", "XLV_IMAGE_MAX_BYTES"]),
        ("/declares-huge", ALLOW_LOCAL, ["declares 50000000 bytes (Content-Length), over the 20971520-byte limit"]),
        ("/lying-short", ALLOW_LOCAL, ["decoding failed"]),
        ("/lying-long", ALLOW_LOCAL, [f"closed the connection after {len(GOOD)} bytes, before the declared 100000"]),
        ("/not-image", ALLOW_LOCAL, ["not an image in an accepted format"]),
        ("/truncated.png", ALLOW_LOCAL, ["decoding failed"]),
        ("/bomb.png", ALLOW_LOCAL, ["400000000 pixels", "pixel limit"]),
        ("/gzip", ALLOW_LOCAL, ["Content-Encoding: gzip"]),
        ("/missing", ALLOW_LOCAL, ["HTTP 404"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_faulty_servers_are_refused_with_the_reason(srv, path, limits, fragments):
    message = refused(srv.url(path), limits, *fragments)
    assert message.startswith(srv.url(path))  # names the image


def test_slow_drip_is_stopped_by_the_total_deadline(srv):
    for path in ("/drip", "/drip-headers"):
        started = time.monotonic()
        refused(srv.url(path), ImageLimits(allow_hosts=("127.0.0.1",), timeout=2, deadline=0.5),
                "longer than the 0.5-second total limit", "image_deadline", "XLV_IMAGE_DEADLINE")
        assert time.monotonic() - started < 2, path  # well before the per-read timeout could help


def test_a_silent_server_hits_the_read_timeout(srv):
    started = time.monotonic()
    refused(srv.url("/stall"), ImageLimits(allow_hosts=("127.0.0.1",), timeout=0.3),
            "did not answer within the 0.3-second timeout", "image_timeout", "XLV_IMAGE_TIMEOUT")
    assert time.monotonic() - started < 2


def test_no_proxy_from_the_environment_is_used(srv, monkeypatch, net):
    monkeypatch.setenv("http_proxy", "http://10.9.9.9:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    assert load_image(srv.url("/good.png"), ALLOW_LOCAL).getpixel((0, 0)) == RED
    assert net.connects == [("127.0.0.1", srv.port)]


# -- https: SNI and certificate checked against the URL's host, not the pinned address --------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    pytest.importorskip("cryptography")
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    sni = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    server, thread = start_server(lambda s: server_ctx.wrap_socket(s, server_side=True))
    server.sni = sni
    server.client_ctx = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    yield server
    stop_server(server, thread)


def test_slow_drip_over_tls_is_stopped_by_the_total_deadline(tls, net, monkeypatch):
    """The deadline wakes a read blocked inside TLS too (the socket it shuts is the TLS one)."""
    monkeypatch.setattr(image_fetch, "_ssl_context", lambda: tls.client_ctx)
    net.names["img.test"] = ["127.0.0.1"]
    port = tls.server_address[1]
    for path in ("/drip", "/drip-headers"):
        started = time.monotonic()
        refused(f"https://img.test:{port}{path}", ImageLimits(allow_hosts=("127.0.0.1",), timeout=2, deadline=0.5),
                "longer than the 0.5-second total limit")
        assert time.monotonic() - started < 2, path  # well before the per-read timeout could help


def test_https_uses_the_url_host_for_sni_and_certificate(tls, net, monkeypatch):
    monkeypatch.setattr(image_fetch, "_ssl_context", lambda: tls.client_ctx)
    tls.hits.clear()
    tls.sni.clear()
    port = tls.server_address[1]
    net.names["img.test"] = ["127.0.0.1"]
    image = load_image(f"https://img.test:{port}/good.png", ALLOW_LOCAL)
    assert image.getpixel((0, 0)) == RED
    assert tls.sni == ["img.test"] and tls.hits == [("/good.png", f"img.test:{port}")]
    assert net.connects == [("127.0.0.1", port)]
    # Same address, another name: the certificate (for img.test) does not match.
    net.names["other.test"] = ["127.0.0.1"]
    refused(f"https://other.test:{port}/good.png", ALLOW_LOCAL, "TLS certificate verification failed")


# -- load_images ---------------------------------------------------------------------------


def test_load_images_names_where_a_refused_image_was(srv):
    with pytest.raises(ImageError, match=r"^messages\[2\]\.content\[1\]: .*decoding failed"):
        load_images([data_uri(GOOD), srv.url("/truncated.png")], ALLOW_LOCAL, ["messages[0].content[0]", "messages[2].content[1]"])
    with pytest.raises(ImageError, match=r"^images\[0\]: .*loopback"):
        load_images([srv.url("/good.png")], ImageLimits(), ["images[0]"])


def test_nothing_is_written_to_disk(srv, local_dir, monkeypatch):
    writes = []

    def no(*args, **kwargs):
        writes.append(args)
        raise AssertionError(f"write attempted: {args}")

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            no(file, mode)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            no(path, flags)
        return real_os_open(path, flags, *args, **kwargs)

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    limits = ImageLimits(allow_hosts=("127.0.0.1",), local_dir=str(local_dir))
    for source in (data_uri(GOOD), srv.url("/good.png"), f"file://{local_dir}/good.png"):
        load_image(source, limits)
    assert writes == []


# -- limits: defaults, env vars, launch options --------------------------------------------

SAMPLES = {  # field: (env value, parsed), (launch option value, parsed)
    "timeout": (("2.5", 2.5), (4, 4.0)),
    "deadline": (("7", 7.0), ("8.5", 8.5)),
    "max_bytes": (("1MiB", 1048576), (4096, 4096)),
    "max_pixels": (("1000", 1000), ("2_000", 2000)),
    "max_redirects": (("0", 0), (7, 7)),
    "allow_hosts": (("10.0.0.0/8, Img.Test", ("10.0.0.0/8", "img.test")), (["127.0.0.1"], ("127.0.0.1/32",))),
    "local_dir": (("{a}", "{a}"), ("{b}", "{b}")),
}


def test_samples_cover_every_knob():
    assert set(SAMPLES) == {k.field for k in KNOBS} == {f for f in ImageLimits().to_dict()}


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.field)
def test_each_knob_from_env_and_overridden_by_launch_option(knob, monkeypatch, tmp_path):
    dirs = {"a": str((tmp_path / "a").resolve()), "b": str((tmp_path / "b").resolve())}
    for d in dirs.values():
        os.mkdir(d)
    (env_raw, env_value), (opt_raw, opt_value) = SAMPLES[knob.field]
    if knob.kind == "dir":
        env_raw, env_value, opt_raw, opt_value = (x.format(**dirs) for x in (env_raw, env_value, opt_raw, opt_value))
    default = getattr(ImageLimits(), knob.field)
    assert getattr(ImageLimits.from_config({}), knob.field) == default
    monkeypatch.setenv(knob.env, str(env_raw))
    assert getattr(ImageLimits.from_config(None), knob.field) == env_value
    assert getattr(ImageLimits.from_config({"unrelated": 1}), knob.field) == env_value
    assert getattr(ImageLimits.from_config({knob.option: opt_raw}), knob.field) == opt_value
    assert env_value != default and opt_value != env_value  # each step is observable


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("image_timeout", "0", "must be a number of seconds > 0"),
        ("image_timeout", "soon", "must be a number of seconds > 0"),
        ("image_deadline", "inf", "must be a number of seconds > 0"),
        ("image_max_bytes", "-5", "must be a positive number of bytes"),
        ("image_max_bytes", "20 parsecs", "must be a positive number of bytes"),
        ("image_max_pixels", "999999999999", "at most 89478485"),
        ("image_max_pixels", 1.5, "must be a positive number of pixels"),
        ("image_max_redirects", "-1", "must be an integer >= 0"),
        ("image_allow_hosts", "http://x/", "is neither a host name nor an IP address/network"),
        ("image_allow_hosts", 5, "comma-separated string or a list"),
        ("image_local_dir", "/nonexistent/xlv-images", "does not exist"),
    ],
)
def test_bad_values_are_clear_value_errors(option, value, fragment, monkeypatch):
    with pytest.raises(ValueError, match="launch option " + option) as info:
        ImageLimits.from_config({option: value})
    assert fragment in str(info.value)
    env = next(k.env for k in KNOBS if k.option == option)
    if isinstance(value, str):
        monkeypatch.setenv(env, value)
        with pytest.raises(ValueError, match="environment variable " + env):
            ImageLimits.from_config(None)


def test_local_dir_must_be_a_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a directory"):
        ImageLimits.from_config({"image_local_dir": str(tmp_path / "f")})


def test_limits_round_trip_as_a_plain_dict(tmp_path):
    limits = ImageLimits.from_config({
        "image_timeout": "3", "image_max_bytes": "2MiB", "image_allow_hosts": "127.0.0.1,img.test",
        "image_local_dir": str(tmp_path), "image_max_redirects": 1,
    })
    wire = json.loads(json.dumps(limits.to_dict()))
    assert isinstance(wire["allow_hosts"], list)
    assert ImageLimits(**wire) == limits
    assert limits.allow_hosts == ("127.0.0.1/32", "img.test") and limits.max_bytes == 2 * 1024 * 1024


def test_xinference_media_limits_apply_where_ours_are_unset(monkeypatch):
    """Xinference's two media limits are the fallback of ours; its two switches are not honoured."""
    monkeypatch.setenv("XINFERENCE_MEDIA_MAX_BYTES", "50")
    monkeypatch.setenv("XINFERENCE_MEDIA_FETCH_TIMEOUT", "7")
    monkeypatch.setenv("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS", "false")
    monkeypatch.setenv("XINFERENCE_MEDIA_ALLOW_LOCAL_PATH", "true")
    limits = ImageLimits.from_config(None)
    assert (limits.max_bytes, limits.deadline, limits.allow_hosts, limits.local_dir) == (50, 7.0, (), None)
    refused(data_uri(GOOD), limits, "over the 50-byte limit")
    monkeypatch.setenv("XLV_IMAGE_MAX_BYTES", "2000")
    assert ImageLimits.from_config(None).max_bytes == 2000
    assert ImageLimits.from_config({"image_max_bytes": 3000}).max_bytes == 3000
    monkeypatch.setenv("XINFERENCE_MEDIA_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="environment variable XINFERENCE_MEDIA_FETCH_TIMEOUT"):
        ImageLimits.from_config(None)


def test_limits_through_env_vars_take_effect(srv, local_dir, monkeypatch):
    monkeypatch.setenv("XLV_IMAGE_ALLOW_HOSTS", "127.0.0.1")
    assert load_image(srv.url("/good.png"), ImageLimits.from_config(None)).getpixel((0, 0)) == RED
    monkeypatch.setenv("XLV_IMAGE_MAX_BYTES", "50")
    refused(data_uri(GOOD), ImageLimits.from_config(None), "over the 50-byte limit", "XLV_IMAGE_MAX_BYTES")
    monkeypatch.delenv("XLV_IMAGE_MAX_BYTES")
    monkeypatch.setenv("XLV_IMAGE_MAX_PIXELS", "47")
    refused(data_uri(GOOD), ImageLimits.from_config(None), "8x6 = 48 pixels", "47-pixel limit")
    monkeypatch.setenv("XLV_IMAGE_MAX_PIXELS", "48")
    assert load_image(data_uri(GOOD), ImageLimits.from_config(None)).size == (8, 6)
    monkeypatch.setenv("XLV_IMAGE_TIMEOUT", "0.3")
    refused(srv.url("/stall"), ImageLimits.from_config(None), "0.3-second timeout")
    monkeypatch.setenv("XLV_IMAGE_TIMEOUT", "5")
    monkeypatch.setenv("XLV_IMAGE_DEADLINE", "0.4")
    refused(srv.url("/drip"), ImageLimits.from_config(None), "0.4-second total limit")
    monkeypatch.setenv("XLV_IMAGE_MAX_REDIRECTS", "0")
    refused(srv.url("/redirect?to=/good.png"), ImageLimits.from_config(None), "more than 0 redirects")
    monkeypatch.setenv("XLV_IMAGE_LOCAL_DIR", str(local_dir))
    assert load_image("good.png", ImageLimits.from_config(None)).size == (8, 6)


def test_limits_through_launch_options_take_effect(srv, local_dir):
    def cfg(**options):
        return ImageLimits.from_config({"image_allow_hosts": ["127.0.0.1"], **options})

    refused(srv.url("/good.png"), ImageLimits.from_config({"image_allow_hosts": ""}), "loopback")
    assert load_image(srv.url("/good.png"), cfg()).getpixel((0, 0)) == RED
    refused(srv.url("/huge"), cfg(image_max_bytes="64KiB"), "passed the 65536-byte limit")
    refused(data_uri(GOOD), cfg(image_max_pixels=47), "47-pixel limit", "image_max_pixels")
    refused(srv.url("/stall"), cfg(image_timeout=0.3), "0.3-second timeout")
    refused(srv.url("/drip"), cfg(image_timeout=5, image_deadline=0.4), "0.4-second total limit")
    refused(srv.url("/redirect?to=/good.png"), cfg(image_max_redirects=0), "more than 0 redirects")
    assert load_image(srv.url("/redirect?to=/good.png"), cfg(image_max_redirects=1)).size == (8, 6)
    assert load_image("sub/inner.png", cfg(image_local_dir=str(local_dir))).size == (8, 6)


def test_launch_option_beats_env_var_in_behaviour(srv, monkeypatch):
    monkeypatch.setenv("XLV_IMAGE_ALLOW_HOSTS", "127.0.0.1")
    refused(srv.url("/good.png"), ImageLimits.from_config({"image_allow_hosts": "10.0.0.0/8"}), "loopback")
    assert srv.hits == []


# -- docs and doctests ---------------------------------------------------------------------


def test_doctests_of_the_module_pass():
    attempted = 0
    for module in (load, limits, naming, sources, addresses, image_fetch, decode):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module
        attempted += result.attempted
    assert attempted >= 20


def test_describe_names_sources_briefly():
    assert describe(data_uri(b"x" * 3000)).endswith("(4000 base64 chars)")
    assert describe("https://a.test/b.png") == "https://a.test/b.png"
    assert describe(None) == "<NoneType>"
