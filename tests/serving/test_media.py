"""Images at the API edge (serving/media.py): data URIs decode to the picture sent, every refusal
is a 400 naming its limit, URLs are fetched only from allowed hosts at public addresses, and the
digest tells pictures apart. No test touches the internet: fetches go to a server started here,
reached through the test-only address_ok argument."""

import base64
import io
import ipaddress
import shutil
import ssl
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.media import (
    MediaLimits,
    image_from_pil,
    load_image,
    load_images,
)
from qwen35_ray.serving.media_fetch import is_public_address

LIMITS = MediaLimits()


def picture(width=40, height=30, seed=0, mode="RGB") -> Image.Image:
    gen = np.random.default_rng(seed)
    channels = len(mode)
    return Image.fromarray(gen.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def part(data: bytes, media_type="image/png") -> dict:
    url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def refused(p, limits=LIMITS, **kwargs) -> str:
    with pytest.raises(OpenAIError) as e:
        load_image(p, limits, "messages[0].content[1]", **kwargs)
    assert e.value.status == 400 and e.value.body()["error"]["type"] == "invalid_request_error"
    assert e.value.param.startswith("messages[0].content[1]")
    return e.value.message


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_data_uri_gives_the_pixels_sent(fmt):
    image = picture(41, 23)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    loaded = load_image(part(encode(image, fmt, **kwargs), f"image/{fmt.lower()}"), LIMITS)
    assert loaded.image.mode == "RGB" and loaded.image.size == (41, 23)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(image))


def test_jpeg_decodes_as_pillow_decodes_it():
    data = encode(picture(), "JPEG", quality=90)
    loaded = load_image(part(data, "image/jpeg"), LIMITS)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(Image.open(io.BytesIO(data))))


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    loaded = load_image(part(out.getvalue(), "image/gif"), LIMITS)
    assert loaded.image.getpixel((3, 3)) == (255, 0, 0)


def test_transparency_is_composited_onto_white_as_the_processor_does():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    loaded = load_image(part(encode(clear, "PNG")), LIMITS)
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("media_type", ["image/jpeg", "", "application/octet-stream"])
def test_a_mislabelled_or_untyped_image_decodes_as_what_it_is(media_type):
    # clients often label every image image/jpeg
    image = picture()
    loaded = load_image(part(encode(image, "PNG"), media_type), LIMITS)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(image))


def test_bad_data_uris_are_400s_that_say_what_is_wrong():
    png = encode(picture(), "PNG")
    bad_base64 = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AB$C"}}
    assert "not valid base64" in refused(bad_base64)
    not_base64 = {"type": "image_url", "image_url": {"url": "data:image/png,%89PNG"}}
    assert "only base64" in refused(not_base64)
    assert "not a PNG, JPEG, WebP or GIF" in refused(part(b"hello, not an image"))
    # a format Pillow reads but we do not: no other parser sees a client's bytes
    assert "not a PNG, JPEG, WebP or GIF" in refused(part(encode(picture(), "BMP"), ""))
    assert "'image/svg+xml' is not supported" in refused(part(png, "image/svg+xml"))
    assert "'text/plain' is not supported" in refused(part(png, "text/plain"))
    assert "damaged" in refused(part(png[: len(png) // 2]))
    assert "data: URI or an http(s) URL" in refused(
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
    )
    assert "must be" in refused({"type": "image_url", "image_url": {}})


def test_too_many_bytes_is_refused_before_decoding():
    limits = MediaLimits(max_image_bytes=1000)
    assert "max_image_bytes allows 1,000" in refused(part(encode(picture(), "PNG")), limits)
    # 200 MB of base64 is refused on its length alone, at once
    huge = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 2**28}}
    start = time.perf_counter()
    assert "max_image_bytes" in refused(huge)
    assert time.perf_counter() - start < 1.0


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is empty: a bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def test_too_many_pixels_is_refused_from_the_header():
    limits = MediaLimits(max_pixels=1000)
    message = refused(part(encode(picture(40, 30), "PNG")), limits)
    assert "40x30 = 1,200 pixels" in message and "max_pixels allows 1,000" in message
    # exactly at the limit is allowed
    assert load_image(part(encode(picture(40, 25), "PNG")), limits).image.size == (40, 25)
    # 8.1e7 and 1e10 pixels claimed in 60 bytes, never decoded: refused by our limit from the
    # header, and past Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) by that guard
    assert "9000x9000 = 81,000,000 pixels" in refused(part(png_header_only(9000, 9000)))
    bomb = part(png_header_only(100_000, 100_000))
    for limits in (LIMITS, MediaLimits(max_pixels=10**12)):
        message = refused(bomb, limits)
        assert "more than 178,956,970 pixels" in message and "max_pixels allows" in message


def test_an_extreme_aspect_ratio_is_refused():
    assert "aspect ratio past 200" in refused(part(encode(picture(402, 2), "PNG")))


def test_image_count_is_checked_before_any_image_is_read():
    junk = part(b"not an image")
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}] + [junk] * 9}]
    with pytest.raises(OpenAIError, match="9 images; limit_mm_per_prompt allows 8") as e:
        load_images(messages, LIMITS)
    assert e.value.status == 400
    good = part(encode(picture(), "PNG"))
    messages = [
        {"role": "system", "content": "plain"},
        {"role": "user", "content": [good, {"type": "text", "text": "and"}, good]},
    ]
    assert len(load_images(messages, MediaLimits(limit_mm_per_prompt=2))) == 2


def test_digest_tells_pictures_apart_not_encodings():
    image = picture(20, 10)
    as_png = load_image(part(encode(image, "PNG")), LIMITS)
    as_webp = load_image(part(encode(image, "WEBP", lossless=True), "image/webp"), LIMITS)
    assert as_png.digest == as_webp.digest == image_from_pil(image, LIMITS).digest
    other = load_image(part(encode(picture(20, 10, seed=1), "PNG")), LIMITS)
    assert other.digest != as_png.digest
    # the same bytes in another shape
    pixels = np.asarray(image).reshape(-1)
    reshaped = Image.fromarray(pixels.reshape(20, 10, 3))
    assert image_from_pil(reshaped, LIMITS).digest != as_png.digest


def test_pil_images_from_the_python_api_have_the_same_pixel_limit():
    with pytest.raises(OpenAIError, match="max_pixels allows 100"):
        image_from_pil(picture(11, 10), MediaLimits(max_pixels=100))


@pytest.mark.parametrize(
    "address,public",
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::1", False),
        ("2002:5db8:d822::1", True),
        ("64:ff9b::a00:1", False),
        ("64:ff9b::5db8:d822", True),
    ],
)
def test_only_public_addresses_are_fetched_from(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_urls_are_refused_unless_the_operator_allows_their_host():
    message = refused(url_part("https://example.com/cat.png"))
    assert "allowed_media_domains" in message and "data: URI" in message
    limits = MediaLimits(allowed_media_domains=("images.example.com",))
    assert "'example.com' is not allowed" in refused(url_part("https://example.com/a.png"), limits)
    assert "http(s)" in refused(url_part("ftp://images.example.com/a.png"), limits)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "169.254.169.254", "10.0.0.1"])
def test_allowed_hosts_at_private_addresses_are_not_fetched(host):
    limits = MediaLimits(allowed_media_domains=(host,))
    assert "non-public address" in refused(url_part(f"http://{host}:9/a.png"), limits)


PNG = encode(picture(24, 16, seed=3), "PNG")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        routes = {
            "/a.png": lambda: self._send(PNG),
            "/hop1": lambda: self._redirect("/hop2"),
            "/hop2": lambda: self._redirect(f"http://127.0.0.1:{port}/a.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/elsewhere": lambda: self._redirect(f"http://localhost:{port}/a.png"),
            "/big": lambda: self._send(b"\0" * 5000),
            "/big-unsized": lambda: self._send(b"\0" * 5000, sized=False),
            "/slow": lambda: (time.sleep(1.5), self._send(PNG)),
            "/drip": self._drip,
        }
        route = routes.get(self.path)
        if route is None:
            self.send_error(404)
        else:
            route()

    def _send(self, body: bytes, sized: bool = True):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if sized:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _drip(self):
        """Headers at once, then a byte each 0.1 s: each read is quick, the whole is not."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        for i in range(20):
            self.wfile.write(PNG[i : i + 1])
            self.wfile.flush()
            time.sleep(0.1)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # a client that gave up (the timeout and size tests) breaks the server's write: expected
    httpd.handle_error = lambda request, address: None
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def loopback_ok(ip) -> bool:
    return ip.is_loopback


LOCAL = MediaLimits(allowed_media_domains=("127.0.0.1",), fetch_timeout_s=3.0)


def test_fetch_from_an_allowed_host_gives_the_image_and_follows_redirects(server):
    checked = []

    def address_ok(ip):
        checked.append(ip)
        return ip.is_loopback

    loaded = load_image(url_part(f"{server}/hop1"), LOCAL, address_ok=address_ok)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(Image.open(io.BytesIO(PNG))))
    # every hop's host resolved and checked again
    assert len(checked) == 3
    direct = load_image(url_part(f"{server}/a.png"), LOCAL, address_ok=loopback_ok)
    assert direct.digest == loaded.digest


def test_fetch_refusals_name_their_limit(server):
    def get(path, limits=LOCAL):
        return refused(url_part(f"{server}{path}"), limits, address_ok=loopback_ok)

    assert "max_redirects=3" in get("/loop")
    assert "max_redirects=1" in get("/hop1", MediaLimits(**{**LOCAL.__dict__, "max_redirects": 1}))
    # a redirect to a host the operator did not list
    assert "'localhost' is not allowed" in get("/elsewhere")
    small = MediaLimits(**{**LOCAL.__dict__, "max_image_bytes": 1000})
    assert "5,000 bytes; max_image_bytes allows 1,000" in get("/big", small)
    assert "over 1,000 bytes; max_image_bytes" in get("/big-unsized", small)
    assert "HTTP 404" in get("/missing")
    quick = MediaLimits(**{**LOCAL.__dict__, "fetch_timeout_s": 0.3})
    start = time.perf_counter()
    assert "fetch_timeout_s=0.3" in get("/slow", quick)
    assert time.perf_counter() - start < 1.2
    start = time.perf_counter()
    assert "fetch_timeout_s=0.3" in get("/drip", quick)
    assert time.perf_counter() - start < 1.2


def self_signed(tmp_path, san: str):
    if shutil.which("openssl") is None:
        pytest.skip("the HTTPS tests make their certificate with the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=t"]
        + ["-addext", f"subjectAltName={san}"],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.parametrize("san,ok", [("IP:127.0.0.1", True), ("DNS:other.example", False)])
def test_https_connects_to_the_checked_address_and_verifies_the_name(
    tmp_path, monkeypatch, san, ok
):
    key, cert = self_signed(tmp_path, san)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = url_part(f"https://127.0.0.1:{httpd.server_address[1]}/a.png")
    try:
        # trusted only where the test says so: an untrusted certificate is refused
        assert "certificate verify failed" in refused(url, LOCAL, address_ok=loopback_ok)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        if ok:
            loaded = load_image(url, LOCAL, address_ok=loopback_ok)
            assert loaded.image.size == (24, 16)
        else:
            message = refused(url, LOCAL, address_ok=loopback_ok)
            assert "not valid for '127.0.0.1'" in message
    finally:
        httpd.shutdown()
        httpd.server_close()
