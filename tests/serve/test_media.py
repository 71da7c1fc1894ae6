"""blip2.serve.media: every way a request can name an image, and every way that must be refused."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import io
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from blip2.serve.media import MediaError, MediaPolicy, decode_image_bytes, host_allowed, load_media

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _halves(w: int = 16, h: int = 8) -> Image.Image:
    """Left half red, right half blue: any rotation or flip shows."""
    im = Image.new("RGB", (w, h), BLUE)
    im.paste(RED, (0, 0, w // 2, h))
    return im


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _close(px, want, tol=40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, want))


def _load(url: str, policy: MediaPolicy = MediaPolicy()):
    return asyncio.run(load_media(url, policy))


def _refused(url: str, policy: MediaPolicy = MediaPolicy()) -> MediaError:
    with pytest.raises(MediaError) as info:
        _load(url, policy)
    return info.value


# ---------------------------------------------------------------------------------------------- data:


def test_png_data_url_decodes_to_rgb_with_content_hash():
    raw = _png(_halves())
    got = _load(_data_url(raw))
    assert got.image.mode == "RGB" and got.image.size == (16, 8)
    assert got.image.getpixel((0, 0)) == RED and got.image.getpixel((15, 7)) == BLUE
    assert got.sha256 == hashlib.sha256(raw).hexdigest() and got.nbytes == len(raw)


def test_jpeg_data_url_and_line_wrapped_base64():
    raw = _jpeg(_halves())
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style wrapping
    got = _load(f"data:image/jpeg;base64,{wrapped}")
    assert got.image.size == (16, 8) and _close(got.image.getpixel((2, 4)), RED)
    assert got.sha256 == hashlib.sha256(raw).hexdigest()


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    got = _load(_data_url(_png(im))).image
    assert got.mode == "RGB"
    assert got.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert got.getpixel((1, 0)) == (255, 0, 0)
    assert _close(got.getpixel((2, 0)), (127, 127, 127), tol=2)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise for display
    got = _load(_data_url(_jpeg(_halves(16, 8), exif=exif.tobytes()), "image/jpeg")).image
    assert got.size == (8, 16)
    # The left (red) half is now on top.
    assert _close(got.getpixel((4, 2)), RED) and _close(got.getpixel((4, 13)), BLUE)


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:image/png;base64,@@@not*base64@@@", "base64"),
        ("data:image/png;base64,iVBORw0KGgo=A", "base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:,hello", "not an image"),  # RFC 2397: no type means text/plain
        ("data:image/png;base64", "malformed"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "supported format"),  # "hello world"
    ],
)
def test_bad_data_urls_are_400(url, words):
    err = _refused(url)
    assert err.status == 400 and words in err.message


def test_data_url_over_the_byte_cap_is_413_before_decoding():
    raw = _png(Image.effect_noise((64, 64), 50).convert("RGB"))
    err = _refused(_data_url(raw), MediaPolicy(max_image_bytes=len(raw) - 100))
    assert err.status == 413 and "limit" in err.message


# ----------------------------------------------------------------------------------------------- bytes


def test_zero_bytes_not_an_image_and_truncated_are_400_naming_the_problem():
    policy = MediaPolicy()
    with pytest.raises(MediaError, match="empty"):
        decode_image_bytes(b"", policy)
    with pytest.raises(MediaError, match="supported format"):
        decode_image_bytes(b"GIF89a but not really" * 3, policy)
    raw = _png(Image.effect_noise((64, 64), 60).convert("RGB"))
    with pytest.raises(MediaError, match="truncated or corrupt") as info:
        decode_image_bytes(raw[: len(raw) * 2 // 3], policy)
    assert info.value.status == 400


def test_eps_is_not_opened():
    # Pillow would hand EPS to Ghostscript; the header alone is enough for Image.open to accept it.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n" + b"%" * 200 + b"\nshowpage\n"
    Image.open(io.BytesIO(eps))  # the precondition: a plain Pillow open does take it
    with pytest.raises(MediaError, match="supported format"):
        decode_image_bytes(eps, MediaPolicy())


def _png_declaring(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to declare width x height (nothing that large is allocated)."""
    raw = bytearray(_png(Image.new("RGB", (1, 1))))
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # CRC over chunk type + data
    return bytes(raw)


def test_decompression_bomb_is_refused_from_the_header():
    t0 = time.perf_counter()
    # Over our 40M limit but under PIL's 2 x MAX_IMAGE_PIXELS error threshold: only our check stops it.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(MediaError) as info:
        decode_image_bytes(_png_declaring(10000, 10000), MediaPolicy())
    assert info.value.status == 400
    assert "10000x10000 = 100,000,000 pixels, over the limit of 40,000,000" in info.value.message
    # Far over PIL's threshold: PIL refuses inside Image.open; still a 400 naming the limit.
    with pytest.raises(MediaError, match="over the limit of 40,000,000 pixels") as info:
        decode_image_bytes(_png_declaring(20000, 20000), MediaPolicy())
    assert info.value.status == 400
    # A limit above PIL's MAX_IMAGE_PIXELS does not switch PIL's protection off.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(MediaError, match="pixels"):
        decode_image_bytes(_png_declaring(10000, 10000), MediaPolicy(max_pixels=10**12))
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded


def test_max_pixels_counts_real_images_too():
    raw = _png(Image.new("RGB", (20, 20)))
    with pytest.raises(MediaError, match="400 pixels"):
        decode_image_bytes(raw, MediaPolicy(max_pixels=399))
    assert decode_image_bytes(raw, MediaPolicy(max_pixels=400)).image.size == (20, 20)


def test_upload_over_the_byte_cap_is_413():
    raw = _png(Image.new("RGB", (8, 8)))
    with pytest.raises(MediaError) as info:
        decode_image_bytes(raw, MediaPolicy(max_image_bytes=len(raw) - 1))
    assert info.value.status == 413


# ---------------------------------------------------------------------------------------------- policy


def test_host_matching_is_exact_with_star_dot_for_subdomains():
    entries = ("Example.com.", "*.imgs.net", "127.0.0.1", "[::1]")
    allowed = MediaPolicy(allowed_domains=entries).allowed_domains
    assert allowed == ("example.com", "*.imgs.net", "127.0.0.1", "::1")
    assert host_allowed("example.com", allowed) and host_allowed("EXAMPLE.COM.", allowed)
    assert not host_allowed("www.example.com", allowed)  # exact: no implicit subdomains
    assert not host_allowed("example.com.evil.org", allowed) and not host_allowed("badexample.com", allowed)
    assert host_allowed("a.imgs.net", allowed) and host_allowed("a.b.imgs.net", allowed)
    assert not host_allowed("imgs.net", allowed)  # the wildcard is for subdomains only
    assert not host_allowed("evilimgs.net", allowed)
    assert host_allowed("127.0.0.1", allowed) and host_allowed("::1", allowed)
    assert not host_allowed("127.0.0.2", allowed)


@pytest.mark.parametrize(
    "entry", ["http://example.com", "example.com:8080", "example.com/path", "*", "a*.com", "*.1.2.3.4", ""]
)
def test_bad_allow_list_entries_fail_at_startup(entry):
    with pytest.raises(ValueError, match="allowed-media-domains"):
        MediaPolicy(allowed_domains=(entry,))


def test_unsupported_scheme_is_400():
    err = _refused("ftp://127.0.0.1/x.png", MediaPolicy(allowed_domains=("127.0.0.1",)))
    assert err.status == 400 and "scheme" in err.message


# ---------------------------------------------------------------------------------------------- remote

CAP = 100_000
GOOD = _png(_halves())


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # for chunked bodies
    log_message = lambda *a, **k: None  # noqa: E731 - quiet test output

    def _send(self, code: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        srv.paths.append(self.path)
        port = srv.server_address[1]
        if self.path == "/img.png":
            self._send(200, GOOD, Content_Type="image/png")
        elif self.path == "/redirect":
            self._send(302, Location="/img.png")
        elif self.path == "/redirect-off-list":
            self._send(302, Location=f"http://localhost:{port}/secret.png")
        elif self.path == "/redirect-file":
            self._send(302, Location="file:///etc/passwd")
        elif self.path == "/loop":
            self._send(302, Location="/loop")
        elif self.path == "/missing":
            self._send(404, b"no")
        elif self.path == "/gzip":
            self._send(200, zlib.compress(GOOD), Content_Encoding="gzip")
        elif self.path == "/declares-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)  # sends nothing: only the header can reveal the size in time
        elif self.path == "/endless":
            self._endless()
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, GOOD)
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(20):  # each byte well within the per-read timeout, the whole far beyond the total
                self.wfile.write(b"1\r\nx\r\n")
                self.wfile.flush()
                time.sleep(0.15)
        else:
            self._send(404)

    def _endless(self):
        """Chunked, no Content-Length, 64 MiB at most: only reading while counting stops it early."""
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
        try:
            for _ in range(1024):
                self.wfile.write(chunk)
                srv.endless_sent += 65536
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up, as it should
        finally:
            srv.endless_done.set()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up early is the point here
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.paths, srv.endless_sent, srv.endless_done = [], 0, threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


LOCAL = MediaPolicy(allowed_domains=("127.0.0.1",), max_image_bytes=CAP, fetch_timeout_s=5.0)


def test_remote_disabled_by_default_and_nothing_is_fetched(server):
    before = len(server.paths)
    err = _refused(_url(server, "/img.png"))
    assert err.status == 400 and "--allowed-media-domains" in err.message and "disabled" in err.message
    err = _refused(_url(server, "/img.png"), MediaPolicy(allowed_domains=("example.com",)))
    assert err.status == 403 and "127.0.0.1" in err.message
    assert len(server.paths) == before


def test_remote_image_from_allowed_host(server):
    got = _load(_url(server, "/img.png"), LOCAL)
    assert got.image.size == (16, 8) and got.image.getpixel((0, 0)) == RED
    assert got.sha256 == hashlib.sha256(GOOD).hexdigest()


def test_redirect_within_the_list_is_followed(server):
    assert _load(_url(server, "/redirect"), LOCAL).sha256 == hashlib.sha256(GOOD).hexdigest()


def test_redirect_off_the_list_is_refused_before_connecting(server):
    err = _refused(_url(server, "/redirect-off-list"), LOCAL)
    assert err.status == 403 and "'localhost'" in err.message and "redirected" in err.message
    assert "/secret.png" not in server.paths  # localhost is this same server: it was never asked
    err = _refused(_url(server, "/redirect-file"), LOCAL)
    assert err.status == 403 and "'file'" in err.message


def test_redirect_loop_stops_after_max_redirects(server):
    before = server.paths.count("/loop")
    err = _refused(_url(server, "/loop"), MediaPolicy(allowed_domains=("127.0.0.1",), max_redirects=2))
    assert err.status == 400 and "more than 2 redirects" in err.message
    assert server.paths.count("/loop") - before == 3  # the first request and two redirects


def test_http_error_and_compressed_bodies_are_400(server):
    err = _refused(_url(server, "/missing"), LOCAL)
    assert err.status == 400 and "HTTP 404" in err.message
    err = _refused(_url(server, "/gzip"), LOCAL)
    assert err.status == 400 and "compressed" in err.message


def test_content_length_over_the_cap_fails_before_reading(server):
    t0 = time.perf_counter()
    err = _refused(_url(server, "/declares-huge"), LOCAL)
    assert err.status == 413 and "declares 1,000,000,000 bytes" in err.message
    assert time.perf_counter() - t0 < 2.0


def test_endless_body_is_cut_off_while_reading(server):
    server.endless_done.clear()
    err = _refused(_url(server, "/endless"), LOCAL)
    assert err.status == 413 and f"{CAP:,}" in err.message
    assert server.endless_done.wait(10)
    # The server stops once the client hangs up; socket buffers hold a few MiB at most, never the 64 MiB.
    assert server.endless_sent < 32 * 2**20


def test_slow_server_times_out(server):
    policy = MediaPolicy(allowed_domains=("127.0.0.1",), fetch_timeout_s=0.5)
    for path in ("/slow", "/trickle"):  # no answer at all; an answer a byte at a time
        t0 = time.perf_counter()
        err = _refused(_url(server, path), policy)
        assert err.status == 400 and "timed out after 0.5 s" in err.message
        assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------------------------- local


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(GOOD)
    (tmp_path / "secret.png").write_bytes(GOOD)
    return root


def test_local_paths_inside_the_allowed_dir(media_dir: Path):
    policy = MediaPolicy(allowed_local_path=media_dir)
    inside = media_dir / "sub" / "a.png"
    for ref in (str(inside), inside.as_uri(), "sub/a.png", "sub/../sub/a.png"):
        got = _load(ref, policy)
        assert got.sha256 == hashlib.sha256(GOOD).hexdigest() and got.image.getpixel((0, 0)) == RED


def test_local_paths_are_disabled_by_default(media_dir: Path):
    err = _refused(str(media_dir / "sub" / "a.png"))
    assert err.status == 400 and "--allowed-local-media-path" in err.message


def test_dotdot_and_symlink_escapes_are_refused(media_dir: Path):
    policy = MediaPolicy(allowed_local_path=media_dir)
    (media_dir / "link.png").symlink_to(media_dir.parent / "secret.png")
    (media_dir / "linkdir").symlink_to(media_dir.parent)
    for ref in (
        "../secret.png", str(media_dir / ".." / "secret.png"), (media_dir.parent / "secret.png").as_uri(),
        "link.png", "linkdir/secret.png", "/etc/passwd",
    ):
        err = _refused(ref, policy)
        assert err.status == 403 and "outside" in err.message, ref
        if ref.startswith("link"):
            assert str(media_dir.parent) not in err.message  # where a symlink leads is not revealed


def test_local_missing_directory_and_oversized_files(media_dir: Path):
    policy = MediaPolicy(allowed_local_path=media_dir)
    assert "no image file" in _refused("sub/nope.png", policy).message
    assert "not a regular file" in _refused("sub", policy).message
    err = _refused("sub/a.png", MediaPolicy(allowed_local_path=media_dir, max_image_bytes=len(GOOD) - 1))
    assert err.status == 413
    with pytest.raises(ValueError, match="not a directory"):
        MediaPolicy(allowed_local_path=media_dir / "sub" / "a.png")
