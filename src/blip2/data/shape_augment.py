"""Colour- and shape-preserving augmentation of one-flat-shape images (easy-VQA's, or blip2.data.shapes').

The image is split into its layers (background colour, shape colour, and the shape's coverage alpha); the
alpha alone is rescaled, stretched, rotated a little and moved, and the result is composited again with the
*same* shape colour over a new pale background. Pixels never go through a colour transform, so the hue of
the shape cannot change: its interior is exactly the colour it had, and edge pixels lie between that colour
and the background, as anti-aliasing makes them.

Why not BLIP-2's RandomResizedCrop + flip: a crop can cut the shape in half or off the image (the answer
"triangle" then describes a trapezoid, or nothing), and it changes nothing about the background or the
shape's aspect, which is where the default model over-fitted easy-VQA's rendering.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from blip2.data.shapes import MAX_ANGLE, MIN_SIDE, PALETTE, SIZE_RANGE, composite, pale_background

# Stretch of an existing shape (width / height factor). None for circles: a stretched one is an ellipse,
# which neither easy-VQA nor our renderer draws and no answer names.
STRETCH = {"circle": (1.0, 1.0), "rectangle": (0.7, 1.45), "triangle": (0.75, 1.35)}
# A few-pixel shape enlarged further shows its rounded, pixelated corners (a triangle turns into a blob).
MAX_GROW = 2.5
_SHAPE_DISTANCE = 60  # sum of |RGB| differences from the background that counts as "part of the shape"


def layers(image: Image.Image, colour: tuple[int, int, int] | None = None
           ) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int, int]]:
    """(alpha (H, W) in [0, 1], shape colour, background colour) of a one-flat-shape RGB image.

    The background is the commonest colour on the image's border; the shape colour is `colour` when given
    (the label's palette value), else the commonest colour of the pixels far from the background. Alpha is
    each pixel's position on the line from the background to the shape colour, so anti-aliased edges keep
    their partial coverage.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.int64)  # (H, W, 3)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = _commonest(border)
    if colour is None:
        far = arr[np.abs(arr - background).sum(-1) > _SHAPE_DISTANCE]
        if len(far) == 0:
            raise ValueError("the image has no shape: every pixel is close to the background colour.")
        colour = tuple(int(v) for v in _commonest(far))
    direction = np.asarray(colour) - background
    norm = float((direction**2).sum())
    if norm == 0:
        raise ValueError(f"the shape colour {colour} equals the background colour.")
    alpha = ((arr - background) * direction).sum(-1) / norm
    return np.clip(alpha, 0.0, 1.0).astype(np.float32), colour, tuple(int(v) for v in background)


def _commonest(pixels: np.ndarray) -> np.ndarray:
    """The most frequent RGB value of (N, 3) integer pixels."""
    codes = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    code = int(values[counts.argmax()])
    return np.array([code >> 16, (code >> 8) & 255, code & 255])


def _edges(alpha: np.ndarray, hard: bool) -> np.ndarray:
    return (alpha >= 0.5).astype(np.float32) if hard else alpha


def _touches_border(alpha: np.ndarray) -> bool:
    edge = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    return bool((edge > 0.5).any())


def augment(image: Image.Image, rng: random.Random, shape: str, colour: str | None = None) -> Image.Image:
    """A new view of a one-flat-shape image: new size (drawn from the renderer's range), a small stretch
    (none for circles), a rotation of at most MAX_ANGLE (none for circles), a new position, a new pale
    background, and half the time hard (aliased) edges; the shape colour is kept exactly (`colour`: its
    name, when known, else read off the image).

    A shape cut by the image's edge is kept where it is (only the background changes): moved inwards it
    would become a shape it is not.
    """
    if shape not in STRETCH:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(STRETCH)}).")
    alpha, rgb, _ = layers(image, PALETTE[colour] if colour is not None else None)
    size = alpha.shape[0]
    background = pale_background(rng)
    # Hard edges half the time: the shipped model, trained on easy-VQA's blended edges only, misread colours
    # mostly on aliased shapes (README, "Beyond easy-VQA's own images").
    hard = rng.random() < 0.5
    if _touches_border(alpha):
        return composite(_edges(alpha, hard), rgb, background)
    ys, xs = np.nonzero(alpha > 0.02)
    crop = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]  # (h, w)
    h, w = crop.shape
    lo, hi = STRETCH[shape]
    stretch = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    # The longer side gets a size drawn from the renderer's range (scaled to this image), whatever it was.
    scale = rng.uniform(*SIZE_RANGE) * size / 64 / max(w * math.sqrt(stretch), h / math.sqrt(stretch))
    scale = min(scale, MAX_GROW)
    new_w = max(w * scale * math.sqrt(stretch), MIN_SIDE)
    new_h = max(h * scale / math.sqrt(stretch), MIN_SIDE)
    angle = 0.0 if shape == "circle" else rng.uniform(-MAX_ANGLE, MAX_ANGLE)
    # Shrink until the rotated shape fits with a pixel to spare.
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    extent = max(new_w * cos + new_h * sin, new_w * sin + new_h * cos)
    if extent > size - 2:
        new_w, new_h = new_w * (size - 2) / extent, new_h * (size - 2) / extent
    # Float ("F") layers: PIL's 8-bit filters leave a shrunk shape's interior at 254/255, a colour shift.
    layer = Image.fromarray(crop.astype(np.float32), "F")
    layer = layer.resize((max(1, round(new_w)), max(1, round(new_h))), Image.Resampling.BILINEAR)
    grow = max(new_w / w, new_h / h)
    if grow > 1:  # enlarging blurs the one-pixel edge over `grow` pixels: steepen it back around alpha 0.5
        layer = Image.fromarray(np.clip((np.asarray(layer) - 0.5) * grow + 0.5, 0, 1).astype(np.float32), "F")
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    canvas = Image.new("F", (size, size), 0.0)
    left = rng.randint(0, max(0, size - layer.width))
    top = rng.randint(0, max(0, size - layer.height))
    canvas.paste(layer, (left, top))
    return composite(_edges(np.asarray(canvas, dtype=np.float32), hard), rgb, background)
