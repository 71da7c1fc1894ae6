"""Image loading and preprocessing: pixel parity with transformers' PIL processors, errors for people."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.data.images import (
    ImageError,
    ImageProcessor,
    center_crop,
    eval_resize,
    load_image,
    random_resized_crop_box,
    train_transform,
)
from blip2.models.config import CLIP_MEAN, CLIP_STD, ImageConfig

SAMPLE = Path(__import__("matplotlib").get_data_path()) / "sample_data"


def synthetic_image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise (w, h): resampling differences show up, unlike flat colours."""
    w, h = size
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rs.randint(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


# ------------------------------------------------------------------------------------------- parity


def _hf_blip(size: int):
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3
    )


def _parity_images() -> list[Image.Image]:
    rgba = synthetic_image(3, (97, 61), "RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(97, dtype=np.uint8) * 2, (61, 1))))
    palette = synthetic_image(4, (50, 80)).convert("P")
    palette.info["transparency"] = 0
    return [
        synthetic_image(0, (150, 100)),
        synthetic_image(1, (640, 480)),
        synthetic_image(2, (37, 300)),
        synthetic_image(5, (224, 224)),
        synthetic_image(6, (120, 90), "L"),
        rgba,
        palette,
        Image.open(SAMPLE / "grace_hopper.jpg"),
    ]


@pytest.mark.parametrize("size", [224, 364, 33])
def test_squash_matches_transformers_blip_image_processor_pil_exactly(size: int) -> None:
    ours, hf = ImageProcessor(ImageConfig(size=size)), _hf_blip(size)
    for image in _parity_images():
        expected = hf(image, return_tensors="pt")["pixel_values"]
        got = ours(image)
        assert got.shape == expected.shape == (1, 3, size, size) and got.dtype == torch.float32
        assert torch.equal(got, expected), (image.mode, image.size, (got - expected).abs().max().item())


def test_batch_matches_one_by_one() -> None:
    images = _parity_images()
    proc = ImageProcessor(ImageConfig(size=64))
    batch = proc(images)
    assert batch.shape == (len(images), 3, 64, 64)
    assert torch.equal(batch, torch.cat([proc(im) for im in images]))


def test_shorter_side_crop_matches_transformers_clip_processor_when_offsets_agree() -> None:
    # HF floors the crop offset, torchvision rounds; with even margins both give the same pixels.
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, resample=3,
    )
    cfg = ImageConfig(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, resize="shorter_side_crop", resize_to=256)
    images = [synthetic_image(0, (300, 200)), synthetic_image(1, (200, 400)), synthetic_image(2, (64, 64))]
    for image in images:
        assert torch.equal(ImageProcessor(cfg)(image), hf(image, return_tensors="pt")["pixel_values"])


def test_shorter_side_crop_geometry_follows_torchvision() -> None:
    cfg = ImageConfig(size=224, resize="shorter_side_crop", resize_to=256)
    image = synthetic_image(0, (301, 211))  # (w, h): long side int(256 * 301 / 211) = 365, margins 141 and 32
    resized = image.resize((365, 256), resample=Image.Resampling.BICUBIC)
    expected = resized.crop((70, 16, 294, 240))  # left = round(141 / 2) = 70: half to even, like torchvision
    assert np.array_equal(np.asarray(eval_resize(image, cfg)), np.asarray(expected))
    # resize_to=None: short side straight to `size` (CLIP style)
    out = eval_resize(image, dataclasses.replace(cfg, resize_to=None))
    assert out.size == (224, 224)


def test_center_crop_too_small_is_an_error() -> None:
    with pytest.raises(ImageError, match="resize it first"):
        center_crop(synthetic_image(0, (20, 30)), 24)


def test_normalize_is_x_over_255_minus_mean_over_std() -> None:
    cfg = ImageConfig(size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    pixels = ImageProcessor(cfg)(Image.new("RGB", (5, 7), (255, 0, 51)))
    expected = [(1.0 - 0.1) / 0.5, (0.0 - 0.2) / 0.25, (0.2 - 0.3) / 2.0]
    for c in range(3):
        torch.testing.assert_close(pixels[0, c], torch.full((8, 8), expected[c]), rtol=0, atol=1e-6)


def test_unknown_resize_mode_is_an_error() -> None:
    bad = dataclasses.replace(ImageConfig(), resize="stretch")  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="stretch"):
        ImageProcessor(bad)(synthetic_image(0, (10, 10)))
    with pytest.raises(ImageError, match="lanczos"):
        ImageProcessor(dataclasses.replace(ImageConfig(), resample="lanczos"))  # type: ignore[arg-type]


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ImageError, match="no images"):
        ImageProcessor(ImageConfig())([])


# -------------------------------------------------------------------------------------------- loading


def test_load_from_paths_and_pil(tmp_path: Path) -> None:
    image = synthetic_image(0, (40, 30))
    image.save(tmp_path / "a.png")
    for source in [str(tmp_path / "a.png"), tmp_path / "a.png", image, image.convert("L").convert("RGB")]:
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (40, 30)
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png")), np.asarray(image))
    gray = load_image(image.convert("L"))
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 0], np.asarray(image.convert("L")))


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba)).tolist() == [[[255, 255, 255]] * 4] * 4


def test_load_from_arrays() -> None:
    rgb = np.asarray(synthetic_image(0, (6, 5)))  # (5, 6, 3) uint8
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    # floats in [0, 1] round back to the same bytes (k / 255 never truncates to k - 1)
    assert np.array_equal(np.asarray(load_image(rgb.astype(np.float32) / 255)), rgb)
    gray = rgb[..., 0]
    for arr in [gray, gray[..., None], gray.astype(np.int64)]:
        out = np.asarray(load_image(arr))
        assert out.shape == (5, 6, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 255, np.uint8)], -1)
    assert np.array_equal(np.asarray(load_image(rgba)), rgb)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((3, 8, 8), np.uint8), "channels must come last"),
        (np.zeros((8, 8, 2), np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), "shape"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.full((4, 4, 3), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), r"\[0, 1\]"),
        (np.full((4, 4), 300, np.int32), r"\[0, 255\]"),
        (np.zeros((4, 4), bool), "dtype bool"),
    ],
)
def test_bad_arrays_are_image_errors(array: np.ndarray, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        load_image(array)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=f"{path} does not exist"):
        load_image(path)
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_not_an_image_names_the_path(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match=f"{text} is not a readable image") as info:
        load_image(text)
    assert isinstance(info.value, ValueError)
    truncated = tmp_path / "cut.jpg"
    synthetic_image(0, (64, 64)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    with pytest.raises(ImageError, match="cut.jpg is not a readable image"):
        load_image(truncated)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    synthetic_image(0, (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x 1000: PIL's error threshold
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_image(path)


def test_unsupported_type_is_an_error() -> None:
    with pytest.raises(ImageError, match="list"):
        load_image([[0, 1], [2, 3]])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- train


def test_random_resized_crop_box_stays_in_bounds_and_scale() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(300, 200, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.5 * 60000 * 0.97 <= w * h <= 60000  # rounding of w and h only
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_random_resized_crop_box_falls_back_to_a_centre_crop() -> None:
    # A 1000x10 strip admits no 3/4..4/3 box holding half its area: centre crop clamped to ratio 4/3.
    assert random_resized_crop_box(1000, 10, random.Random(0)) == (493, 0, 506, 10)


@pytest.mark.parametrize("make_rng", [lambda s: random.Random(s), lambda s: torch.Generator().manual_seed(s)])
def test_train_transform_is_reproducible(make_rng) -> None:  # noqa: ANN001
    cfg = ImageConfig(size=32)
    image = synthetic_image(0, (120, 80))
    a = [np.asarray(train_transform(image, cfg, make_rng(7))) for _ in range(2)]
    b = np.asarray(train_transform(image, cfg, make_rng(8)))
    assert a[0].shape == (32, 32, 3) and np.array_equal(a[0], a[1]) and not np.array_equal(a[0], b)
    p1 = ImageProcessor(cfg, train=True, rng=make_rng(3))
    p2 = ImageProcessor(cfg, train=True, rng=make_rng(3))
    assert torch.equal(p1([image, image]), p2([image, image]))


def test_train_transform_flips_about_half_the_time() -> None:
    # Dark left half, bright right half: every crop spans the middle (width > 0.6 W), so the flip shows.
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[:, 50:] = 255
    image, cfg, rng = Image.fromarray(arr), ImageConfig(size=16), random.Random(0)
    flips = 0
    for _ in range(200):
        out = np.asarray(train_transform(image, cfg, rng)).astype(int)
        assert out[:, 0].mean() != out[:, -1].mean()
        flips += out[:, 0].mean() > out[:, -1].mean()
    assert 70 < flips < 130
