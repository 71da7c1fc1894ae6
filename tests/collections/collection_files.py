"""Generated image folders for the collections tests: good images, and one file of every bad kind."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> the start of the error the reader records for it
BAD_KINDS = {
    "empty.png": "empty file",
    "text.jpg": "not an image",
    "truncated-png.png": "truncated image file",
    "truncated-jpg.jpg": "truncated image file",
    "bomb.png": "decompression bomb",
}


def good_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """Gradients plus noise, different per seed (flat colours would hide resampling differences)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), np.full((h, w), (seed * 37) % 256)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))


def write_good(folder: Path, n: int, start: int = 0, fmt: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.{fmt}"
        good_image(i).save(path)
        out.append(path)
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels (10^10: far over PIL's limit), no real data."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def write_bad(folder: Path) -> dict[str, Path]:
    """One file of each kind in BAD_KINDS."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in BAD_KINDS}
    paths["empty.png"].write_bytes(b"")
    paths["text.jpg"].write_text("this is a text file, not a JPEG\n")
    for name, fmt in (("truncated-png.png", "PNG"), ("truncated-jpg.jpg", "JPEG")):
        buf = io.BytesIO()
        good_image(99, (64, 64)).save(buf, fmt)
        paths[name].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    paths["bomb.png"].write_bytes(bomb_png())
    return paths


def write_exif_pair(folder: Path) -> tuple[Path, Path]:
    """A JPEG stored rotated with EXIF Orientation 6 ("rotate 90° clockwise to show") and a PNG holding the
    same decoded pixels already upright: loading both must give the same image."""
    folder.mkdir(parents=True, exist_ok=True)
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    good_image(7, (48, 32)).rotate(90, expand=True).save(rotated, quality=95, exif=exif)
    with Image.open(rotated) as im:
        upright_pixels = im.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    upright = folder / "upright.png"
    upright_pixels.save(upright)
    return rotated, upright
