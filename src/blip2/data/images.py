"""Images in, pixels out: loading, eval/train resizing, normalisation (PIL + numpy + torch only).

DESIGN §4: no torchvision. The eval "squash" path is bit-for-bit transformers' `BlipImageProcessorPil`
(itself checked against LAVIS' `blip_image_eval`, REFERENCE §4); "shorter_side_crop" and the train transform
follow torchvision's `Resize(int)` + `CenterCrop` and `RandomResizedCrop` + `RandomHorizontalFlip`.
"""

from __future__ import annotations

import math
import os
import random
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = str | os.PathLike | Image.Image | np.ndarray
Rng = random.Random | torch.Generator | None

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageSettings(Protocol):
    """What this module reads from `blip2.models.config.ImageConfig`.

    A protocol, not an import: `data` never imports `models` (DESIGN §3); the dataclass fits it as is.
    """

    @property
    def size(self) -> int: ...
    @property
    def mean(self) -> tuple[float, float, float]: ...
    @property
    def std(self) -> tuple[float, float, float]: ...
    @property
    def resize(self) -> str: ...  # "squash" | "shorter_side_crop"
    @property
    def resize_to(self) -> int | None: ...
    @property
    def resample(self) -> str: ...  # "bicubic" | "bilinear"


class ImageError(ValueError):
    """An input cannot be used as an image: missing file, not an image, bad array. The message names it."""


# ---------------------------------------------------------------------------------------------- loading


def load_image(image: ImageInput) -> Image.Image:
    """A path, a PIL image or an (H, W[, C]) array -> an RGB PIL image (fully decoded, file closed).

    Transparent pixels are composited onto white, as transformers' `convert_to_rgb` does.
    `Image.MAX_IMAGE_PIXELS` stays in force: a decompression bomb is refused with an ImageError.
    """
    if isinstance(image, (str, os.PathLike)):
        return _load_path(Path(image))
    if isinstance(image, Image.Image):
        return _decode(lambda: _to_rgb(image), "the PIL image passed in")
    if isinstance(image, np.ndarray):
        return _to_rgb(Image.fromarray(_array_to_uint8(image)))
    raise ImageError(
        f"cannot use a {type(image).__name__} as an image: pass a file path, a PIL image or a numpy array."
    )


def _load_path(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"image file {path} does not exist.")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file.")

    def read() -> Image.Image:
        with Image.open(path) as im:
            im.load()  # decode now, inside the error handling, and let the file close
            # Cameras store the rotation as an EXIF tag: apply it, as transformers' load_image does.
            return _to_rgb(ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im)

    return _decode(read, str(path))


def _decode(fn: Callable[[], Image.Image], what: str) -> Image.Image:
    try:
        return fn()
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{what} is too large to decode safely ({e}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        # PIL signals undecodable input through all of these (UnidentifiedImageError is an OSError).
        raise ImageError(f"{what} is not a readable image ({type(e).__name__}: {e}).") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    # Same as transformers' image_transforms.convert_to_rgb, so pixels match BlipImageProcessorPil.
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # a copy even when already RGB: the caller may close the file


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) uint8/int in [0, 255] or float in [0, 1] -> uint8 (H, W[, C])."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        channels_first = arr.ndim == 3 and arr.shape[0] in (1, 3, 4)
        hint = " (channels must come last: use arr.transpose(1, 2, 0))" if channels_first else ""
        expected = "(H, W), (H, W, 3) or (H, W, 4)"
        raise ImageError(f"image arrays must have shape {expected}, not {arr.shape}{hint}.")
    if min(arr.shape[:2]) == 0:
        raise ImageError(f"an image array must not be empty, got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageError(f"float image values must be in [0, 1], got [{arr.min()}, {arr.max()}].")
        # Round, not truncate as transformers and torchvision do: truncation turns some k/255 into k-1
        # (24 of 256 levels for float64 k * (1/255), 131 for float16).
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise ImageError(f"integer image values must be in [0, 255], got [{arr.min()}, {arr.max()}].")
        return arr.astype(np.uint8)
    raise ImageError(f"an image array must be uint8 or float in [0, 1], got dtype {arr.dtype}.")


# ------------------------------------------------------------------------------------------- eval resize


def eval_resize(image: Image.Image, cfg: ImageSettings) -> Image.Image:
    """RGB image -> (size, size) RGB image, as the eval transform of `cfg.resize` says (REFERENCE §4)."""
    s, resample = cfg.size, _RESAMPLE[cfg.resample]
    if cfg.resize == "squash":
        # BLIP eval: Resize((S, S)) ignoring aspect; PIL resamples the uint8 image (as HF and torchvision do).
        return image.resize((s, s), resample=resample)
    if cfg.resize == "shorter_side_crop":
        short = cfg.resize_to or s
        w, h = image.size
        # torchvision Resize(int): the short side becomes `short`, the long side is truncated, not rounded.
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize((nw, nh), resample=resample)
        return center_crop(image, s)
    raise ImageError(f"unknown image resize mode {cfg.resize!r} (known: squash, shorter_side_crop).")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop: offsets are round((H - S) / 2) (HF's center_crop floors instead)."""
    w, h = image.size
    if w < size or h < size:
        raise ImageError(f"cannot centre-crop {size}x{size} from a {w}x{h} image; resize it first.")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------- train resize


def _uniform(rng: Rng, low: float, high: float) -> float:
    if isinstance(rng, random.Random):
        return rng.uniform(low, high)
    return float(torch.empty(()).uniform_(low, high, generator=rng))


def _randint(rng: Rng, low: int, high: int) -> int:
    """An integer in [low, high]."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    return int(torch.randint(low, high + 1, (), generator=rng))


def random_resized_crop_box(
    width: int, height: int, rng: Rng, scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a RandomResizedCrop box: torchvision's `get_params`, same algorithm.

    Ten tries at a box with area fraction in `scale` and log-uniform aspect in `ratio`; else the centre
    crop clamped to `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = _randint(rng, 0, height - h), _randint(rng, 0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def train_transform(
    image: Image.Image, cfg: ImageSettings, rng: Rng = None, scale: tuple[float, float] = (0.5, 1.0)
) -> Image.Image:
    """BLIP-2 train transform (`blip2_image_train`, REFERENCE §4): RandomResizedCrop(S, scale=(0.5, 1),
    ratio=(3/4, 4/3), bicubic) then a horizontal flip with probability 0.5.

    `rng` is a `random.Random` or a `torch.Generator` (None: torch's global generator, like torchvision).
    """
    box = random_resized_crop_box(image.width, image.height, rng, scale=scale)
    # Crop first, then resize: the filter then sees only the crop, as in torchvision's resized_crop.
    out = image.crop(box).resize((cfg.size, cfg.size), resample=_RESAMPLE[cfg.resample])
    if _uniform(rng, 0.0, 1.0) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


# ------------------------------------------------------------------------------------------ to pixels


def normalize(images: Sequence[Image.Image], cfg: ImageSettings) -> torch.Tensor:
    """Same-size RGB images -> (B, 3, S, S) float32: x / 255, then (x - mean) / std per channel."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, H, W, 3)
    # Exactly transformers' rescale (float64 multiply, cast to float32) then normalize (float32 arithmetic).
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


class ImageProcessor:
    """Raw images -> pixels (B, 3, S, S) float32 for the vision encoder, as `cfg` says.

    `train=False`: the deterministic eval transform (`eval_resize`). `train=True`: `train_transform`, drawing
    from `rng` (a `random.Random` or `torch.Generator`; None uses torch's global generator). Each DataLoader
    worker needs its own seed for its `rng`, else workers repeat each other's crops.
    """

    def __init__(self, cfg: ImageSettings, *, train: bool = False, rng: Rng = None) -> None:
        if cfg.resample not in _RESAMPLE:
            raise ImageError(f"unknown resample {cfg.resample!r} (known: {', '.join(_RESAMPLE)}).")
        self.cfg, self.train, self.rng = cfg, train, rng

    def transform(self, image: ImageInput) -> Image.Image:
        """One raw image -> its (S, S) RGB PIL image, before normalisation."""
        rgb = load_image(image)
        return train_transform(rgb, self.cfg, self.rng) if self.train else eval_resize(rgb, self.cfg)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ImageError("no images given: pass an image or a non-empty list of images.")
        return normalize([self.transform(im) for im in batch], self.cfg)  # (B, 3, S, S)
