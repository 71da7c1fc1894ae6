"""Image references in requests -> decoded RGB images, within the limits the operator set.

A request names its image as a `data:` URL, an `http(s)://` URL, a `file://` URL or a plain path. Each form is
something an untrusted client controls, so this module guards against:

- server-side request forgery: remote fetching is off unless the server was started with
  `--allowed-media-domains`; the host must be on that list, and so must every redirect hop (redirects are
  followed by hand, at most `max_redirects`, http/https only). An entry matches its exact host name or IP
  literal (case-insensitive, trailing dot ignored, any port); `*.example.com` matches every subdomain at any
  depth but not `example.com` itself (list both to allow both). The list is of names: the operator vouches
  for what they resolve to;
- unbounded downloads and slow servers: a Content-Length over `max_image_bytes` fails before the body is
  read, a body without one is streamed and dropped as soon as it passes the cap, compressed transfer
  encodings (gzip bombs) are refused, and `fetch_timeout_s` bounds each connect/read and the whole fetch;
- path traversal: local paths are read only under `--allowed-local-media-path`, after resolving `..` and
  symlinks; relative paths are taken relative to that directory;
- decompression bombs and hostile files: the declared width x height is checked against `max_pixels` (and
  PIL's own `Image.MAX_IMAGE_PIXELS`) before any pixel is decoded, and only common raster formats are opened
  (never EPS, which Pillow hands to Ghostscript);
- everything else malformed (bad base64, non-image data URLs, empty, truncated or undecodable data) fails
  with one sentence naming the problem.

Status codes: 413 when the image bytes exceed `max_image_bytes` (from any source); 403 when a host, redirect
target or path is outside what the operator allowed; 400 for every other problem, including remote or local
images being disabled, fetch failures and timeouts, and too many pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import io
import ipaddress
import os
import re
import ssl
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageOps

from blip2.data.images import ImageError, load_image

# What cameras, phones and browsers produce (JPEG covers the MPO files phones write). Not EPS: Pillow runs
# Ghostscript on it. Filtered against the plugins this Pillow build has (AVIF is optional).
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_REQUEST_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "blip2-serve"}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


class MediaError(Exception):
    """An image reference that cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class MediaImage:
    image: Image.Image  # RGB, EXIF orientation applied, fully decoded
    sha256: str  # of the raw bytes: the key of the server's image-feature cache
    nbytes: int


@dataclass(frozen=True)
class MediaPolicy:
    """What the operator allows. Entries are validated and normalised here, so a bad flag fails at startup."""

    allowed_domains: tuple[str, ...] = ()
    allowed_local_path: Path | None = None
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # decoded width * height
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        domains = (self.allowed_domains,) if isinstance(self.allowed_domains, str) else self.allowed_domains
        object.__setattr__(self, "allowed_domains", tuple(_domain_entry(d) for d in domains))
        if self.allowed_local_path is not None:
            root = Path(self.allowed_local_path).resolve()
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path {self.allowed_local_path} is not a directory.")
            object.__setattr__(self, "allowed_local_path", root)
        for name in ("max_image_bytes", "max_pixels", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MediaPolicy.{name} must be positive, got {getattr(self, name)!r}.")
        if self.max_redirects < 0:
            raise ValueError(f"MediaPolicy.max_redirects must be >= 0, got {self.max_redirects!r}.")


# ------------------------------------------------------------------------------------------------ entry


async def load_media(url: str, policy: MediaPolicy) -> MediaImage:
    """A `data:`, `http(s)://` or `file://` URL, or a plain path -> the decoded image. Raises MediaError."""
    if not isinstance(url, str) or not url.strip():
        raise MediaError("the image URL is empty: send a data: URL, an http(s) URL or a path.")
    url = url.strip()
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m and len(m.group(1)) > 1 else ""  # "C:" is a Windows drive, not a scheme
    if scheme == "data":
        # Base64 over megabytes and the decode are CPU work: keep them off the event loop.
        return await asyncio.to_thread(lambda: decode_image_bytes(_data_url_bytes(url, policy), policy))
    if scheme in ("http", "https"):
        data = await _fetch(url, policy)
        return await asyncio.to_thread(decode_image_bytes, data, policy)
    if scheme in ("file", ""):
        path = _file_url_path(url) if scheme == "file" else url
        return await asyncio.to_thread(lambda: decode_image_bytes(_read_local(path, policy), policy))
    raise MediaError(f"unsupported image URL scheme {scheme!r}: use a data: URL, http(s):// or a local path.")


def decode_image_bytes(data: bytes, policy: MediaPolicy) -> MediaImage:
    """Raw image file bytes (as uploaded or fetched) -> the decoded RGB image. Raises MediaError."""
    if not data:
        raise MediaError("the image data is empty (0 bytes).")
    if len(data) > policy.max_image_bytes:
        raise MediaError(_too_many_bytes(len(data), policy), status=413)
    Image.init()
    formats = [f for f in _FORMATS if f in Image.OPEN]
    limit = min(policy.max_pixels, Image.MAX_IMAGE_PIXELS or policy.max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            w, h = im.size
            if w * h > limit:  # before load(): only the header has been read so far
                raise MediaError(
                    f"the image is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} pixels."
                )
            im.load()
            # Inside the `with`: closing the file also frees the decoded pixels of `im`.
            rgb = load_image(_exif_transpose(im))  # alpha on white, exactly as the model's own loader does
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"the data is not an image in a supported format ({', '.join(formats)}).") from e
    except Image.DecompressionBombError as e:
        # PIL's own guard (2 x Image.MAX_IMAGE_PIXELS) fires inside Image.open, before our check can.
        raise MediaError(f"the image is over the limit of {limit:,} pixels ({e}).") from e
    except ImageError as e:  # before ValueError, which it subclasses
        raise MediaError(f"the image cannot be converted to RGB ({e.__cause__ or e}).") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
        # PIL reports truncated and corrupt data through all of these.
        raise MediaError(f"the image data is truncated or corrupt ({type(e).__name__}: {e}).") from e
    return MediaImage(image=rgb, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        # A malformed EXIF block should not cost a decodable image its answer; browsers ignore it too.
        return im


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether `host` is on the allow-list (the rule is in the module docstring)."""
    name = _canonical_host(host)
    if name is None:
        return False
    is_ip = _is_ip(name)
    for entry in allowed:
        if entry.startswith("*."):
            if not is_ip and name.endswith(entry[1:]):
                return True
        elif name == entry:
            return True
    return False


# ----------------------------------------------------------------------------------------------- data:


def _data_url_bytes(url: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError("malformed data URL: expected data:image/<type>;base64,<data>.")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0] or "text/plain"  # RFC 2397's default
    if not mime.startswith("image/"):
        raise MediaError(
            f"the data URL holds {_short(mime, 60)!r}, not an image: expected data:image/<type>;base64,..."
        )
    if "base64" not in params[1:]:
        return urllib.parse.unquote_to_bytes(payload)
    if "%" in payload:  # some clients percent-encode the whole URL; base64 itself never contains '%'
        payload = urllib.parse.unquote(payload)
    payload = re.sub(r"\s+", "", payload)  # line-wrapped base64 (RFC 2045) is common
    if len(payload) // 4 * 3 > policy.max_image_bytes + 3:
        raise MediaError(_too_many_bytes(len(payload) // 4 * 3, policy), status=413)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"the data URL is not valid base64 ({e}).") from e


# ---------------------------------------------------------------------------------------------- remote


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allowed_domains:
        raise MediaError(
            "remote image URLs are disabled; start the server with --allowed-media-domains DOMAIN "
            "[DOMAIN ...] to fetch images from those hosts, or send the image as a data: URL."
        )
    target = _checked_remote_url(url, policy)
    where = _short(url)
    # trust_env=False: no proxy variables or .netrc credentials picked up from the server's environment.
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(policy.fetch_timeout_s), follow_redirects=False, trust_env=False,
        verify=_ssl_context(),
    ) as client:
        try:
            # httpx's timeouts are per connect/read; wait_for also bounds a server that trickles bytes.
            return await asyncio.wait_for(_follow(client, target, policy), policy.fetch_timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException) as e:
            raise MediaError(f"fetching {where} timed out after {policy.fetch_timeout_s:g} s.") from e
        except httpx.HTTPError as e:
            raise MediaError(f"could not fetch {where} ({type(e).__name__}: {e}).") from e


async def _follow(client: httpx.AsyncClient, url: httpx.URL, policy: MediaPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        async with client.stream("GET", url, headers=_REQUEST_HEADERS) as resp:
            if resp.is_redirect:
                try:
                    nxt = resp.url.join(resp.headers["location"])
                except httpx.InvalidURL as e:
                    raise MediaError(f"{_short(str(url))} redirected to an invalid URL ({e}).") from e
                url = _checked_remote_url(str(nxt), policy, redirect_from=str(url))
                continue
            if not resp.is_success:
                where = _short(str(url))
                raise MediaError(f"fetching {where} failed: the server answered HTTP {resp.status_code}.")
            return await _read_capped(resp, policy, _short(str(url)))
    raise MediaError(f"fetching {_short(str(url))}: more than {policy.max_redirects} redirects.")


async def _read_capped(resp: httpx.Response, policy: MediaPolicy, where: str) -> bytes:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # We asked for identity; decoding gzip/br would let a small body expand without bound.
        raise MediaError(f"{where} sent a {encoding!r}-compressed body; only uncompressed bodies are read.")
    declared = resp.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > policy.max_image_bytes:
        raise MediaError(f"{where} declares {int(declared):,} bytes; " + _too_many_bytes(None, policy), 413)
    body = bytearray()
    async for chunk in resp.aiter_raw():
        body += chunk
        if len(body) > policy.max_image_bytes:
            # Leaving the `stream` block closes the connection: the rest is never read.
            raise MediaError(f"{where} sent more than the limit; " + _too_many_bytes(None, policy), 413)
    return bytes(body)


def _checked_remote_url(url: str, policy: MediaPolicy, redirect_from: str | None = None) -> httpx.URL:
    via = f" (redirected from {_short(redirect_from)})" if redirect_from else ""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise MediaError(f"invalid image URL {_short(url)}{via} ({e}).") from e
    if parsed.scheme not in ("http", "https"):
        raise MediaError(f"refusing {parsed.scheme!r} URL {_short(url)}{via}: only http(s) is fetched.", 403)
    if not host_allowed(parsed.host, policy.allowed_domains):
        raise MediaError(
            f"host {parsed.host!r}{via} is not in --allowed-media-domains "
            f"({', '.join(policy.allowed_domains)}).",
            403,
        )
    return parsed


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes milliseconds of CPU: once per process, not once per request.
    return httpx.create_ssl_context()


def _domain_entry(entry: str) -> str:
    text = str(entry).strip().lower()
    wildcard = text.startswith("*.")
    name = _canonical_host(text[2:] if wildcard else text)
    if name is None or (wildcard and _is_ip(name)):
        raise ValueError(
            f"--allowed-media-domains: {entry!r} is not a host name, IP address or *.domain wildcard "
            "(no scheme, port or path)."
        )
    return "*." + name if wildcard else name


def _canonical_host(host: str) -> str | None:
    """Lower-case ASCII (punycode) host name or compressed IP literal; None when it is neither."""
    name = host.strip().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if _is_ip(name):
        return ipaddress.ip_address(name).compressed
    if not name or any(c in name for c in "/:@?#*[]\\% \t"):
        return None
    try:
        return httpx.URL(f"http://{name}/").raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError):
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- local


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL {_short(url)} names host {parts.netloc!r}: only file:///path is read.")
    return urllib.parse.unquote(parts.path)


def _read_local(raw: str, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_path
    if root is None:
        raise MediaError(
            "local image paths are disabled; start the server with --allowed-local-media-path DIR "
            "to read images under DIR."
        )
    try:
        resolved = (root / raw).resolve()  # an absolute `raw` replaces root; a relative one lives under it
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, NUL bytes
        raise MediaError(f"cannot resolve image path {_short(raw)} ({e}).") from e
    if not resolved.is_relative_to(root):
        # Name what was asked for, not where it led: the target of a symlink is nobody's business.
        raise MediaError(f"image path {_short(raw)} is outside the --allowed-local-media-path directory.",
                         403)
    # O_NOFOLLOW: a symlink swapped in after resolve() is refused, not followed.
    # O_NONBLOCK: opening a FIFO cannot hang the thread (it is then refused as not a regular file).
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError as e:
        raise MediaError(f"no image file at {_short(raw)}.") from e
    except OSError as e:
        raise MediaError(f"cannot open image path {_short(raw)} ({e.strerror or e}).") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"image path {_short(raw)} is not a regular file.")
        if info.st_size > policy.max_image_bytes:
            raise MediaError(_too_many_bytes(info.st_size, policy), status=413)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(policy.max_image_bytes + 1)  # +1: a file grown since fstat still cannot pass
    if len(data) > policy.max_image_bytes:
        raise MediaError(_too_many_bytes(None, policy), status=413)
    return data


# ------------------------------------------------------------------------------------------------ text


def _too_many_bytes(n: int | None, policy: MediaPolicy) -> str:
    size = f"the image is {n:,} bytes, " if n is not None else "the image is "
    return f"{size}over the limit of {policy.max_image_bytes:,} bytes."


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
