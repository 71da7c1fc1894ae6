"""find_images and decode_stream: which files a job sees, and pixels equal to the model's own preprocessing,
with every bad file recorded as its error while the stream goes on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import collection_files as cf
from blip2.collections import reader
from blip2.collections.reader import Decoded, decode_stream, find_images
from blip2.data.images import ImageProcessor, load_image
from blip2.models.config import ImageConfig

CFG = ImageConfig(size=30)
CROP = ImageConfig(size=24, resize="shorter_side_crop", resize_to=28, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_find_images(tmp_path: Path):
    cf.write_good(tmp_path / "a", 2)
    cf.write_good(tmp_path / "a" / "sub", 1, start=5, fmt="jpg")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "UPPER.PNG").write_bytes(b"")
    odd = tmp_path / "odd.dat"
    odd.write_bytes(b"")
    a = tmp_path / "a"
    flat = find_images([a])
    assert [p.name for p in flat] == ["UPPER.PNG", "img000.png", "img001.png"]
    deep = find_images([a, a / "img000.png", str(a)], recursive=True)  # duplicates named once
    assert [p.relative_to(a).as_posix() for p in deep] == ["UPPER.PNG", "img000.png", "img001.png", "sub/img005.jpg"]
    assert find_images([a], recursive=True, extensions=["jpg"]) == [a / "sub" / "img005.jpg"]
    assert find_images([odd]) == [odd]  # a file named directly is kept whatever its suffix
    with pytest.raises(FileNotFoundError, match="nope.jpg does not exist"):
        find_images([tmp_path / "nope.jpg"])


def test_find_images_files_from(tmp_path: Path, monkeypatch):
    cf.write_good(tmp_path / "a", 3)
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen\na/img002.png\n\na/img000.png\n./a/img000.png\na/gone.png\n")
    got = find_images([], files_from=listing)
    assert got == [Path("a/gone.png"), Path("a/img000.png"), Path("a/img002.png")]  # stale entries kept
    with pytest.raises(FileNotFoundError, match="list"):
        find_images([], files_from=tmp_path / "missing-list.txt")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cfg", [CFG, CROP], ids=["squash", "crop"])
def test_pixels_equal_the_model_preprocessing(tmp_path: Path, workers: int, cfg: ImageConfig):
    paths = cf.write_good(tmp_path, 5) + cf.write_good(tmp_path, 2, start=10, fmt="jpg")
    out = list(decode_stream(paths, cfg, workers=workers, chunk=2))
    assert [d.path for d in out] == paths and all(d.error is None for d in out)
    expected = ImageProcessor(cfg)(paths)  # (B, 3, S, S)
    assert torch.equal(torch.stack([d.pixels for d in out]), expected)
    assert out[0].pixels.dtype == torch.float32 and out[0].pixels.shape == (3, cfg.size, cfg.size)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_recorded_and_the_stream_goes_on(tmp_path: Path, workers: int):
    good = cf.write_good(tmp_path, 3)
    bad = cf.write_bad(tmp_path)
    missing = tmp_path / "vanished.png"
    paths = [good[0], *bad.values(), good[1], missing, good[2]]
    out = {d.path.name: d for d in decode_stream(paths, CFG, workers=workers, chunk=3)}
    assert list(out) == [p.name for p in paths]
    for name, start in cf.BAD_KINDS.items():
        assert out[name].pixels is None and out[name].error.startswith(start), (name, out[name].error)
        assert "\n" not in out[name].error
    assert out["vanished.png"].error == "file does not exist"
    assert "100000000000" not in out["bomb.png"].error and "10000000000 pixels" in out["bomb.png"].error
    assert all(out[p.name].error is None and out[p.name].pixels is not None for p in good)


def test_exif_orientation_is_applied(tmp_path: Path):
    rotated, upright = cf.write_exif_pair(tmp_path)
    assert load_image(rotated).size == load_image(upright).size == (48, 32)
    assert list(load_image(rotated).getdata()) == list(load_image(upright).getdata())
    a, b = decode_stream([rotated, upright], CFG, workers=0)
    assert torch.equal(a.pixels, b.pixels)


def _crash_on(name: str):
    real = reader._decode_file

    def decode(path, cfg):
        if path.name == name:
            os._exit(3)  # what a segfault in a decoder library looks like from the parent
        return real(path, cfg)

    return decode


@pytest.mark.skipif(reader._context().get_start_method() != "fork", reason="the patched decoder reaches workers by fork")
def test_a_worker_crash_is_that_files_error(tmp_path: Path, monkeypatch):
    paths = cf.write_good(tmp_path, 7)
    monkeypatch.setattr(reader, "_decode_file", _crash_on("img002.png"))
    out = list(decode_stream(paths, CFG, workers=2, chunk=2))
    assert [d.path for d in out] == paths
    assert [d.error for d in out] == [None, None, reader.CRASHED, None, None, None, None]
    assert torch.equal(out[6].pixels, ImageProcessor(CFG)([paths[6]])[0])


def test_the_stream_is_lazy_and_bounded(tmp_path: Path):
    paths = cf.write_good(tmp_path, 40)
    stream = decode_stream(paths, CFG, workers=1, chunk=2)
    first = next(stream)
    assert isinstance(first, Decoded) and first.path == paths[0]
    stream.close()  # a consumer that stops early shuts the pool down
