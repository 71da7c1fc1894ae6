"""Our own renderer of easy-VQA-like images: one flat shape in one of 8 colours and 3 shapes on a pale
background, 64x64, with questions about it.

It exists so the default model can be tested (and trained) on images easy-VQA's generator never drew: the
shape's size, position, aspect and small rotation, the background's tint and anti-aliasing all vary more
widely than in easy-VQA, while the colour values stay exactly easy-VQA's 8 (the colour words mean those
RGB values to the model; a shade change would change the answer). Everything is drawn from a
`random.Random`, so a seed fixes an image set.

A scene is drawn as a coverage mask (alpha in [0, 1]: 4x supersampled and box-filtered; when not
anti-aliased, rounded to 0 or 1) composited as `alpha * colour + (1 - alpha) * background`: every pixel lies
between the two colours, and the shape's interior is exactly the palette colour.
"""

from __future__ import annotations

import colorsys
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA's RGB values for its colour words (measured on its images: blip2.eval.easy_vqa).
PALETTE = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
    "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0),
}  # fmt: skip
IMAGE_SIZE = 64
SUPERSAMPLE = 4

# easy-VQA's shapes span about 8-34 px and sit on backgrounds with every channel >= 230; ours go further on
# both so a model that passes here has learned the concepts, not one generator's ranges.
SIZE_RANGE = (9.0, 46.0)  # the longer side of the unrotated shape, px
MIN_SIDE = 6.0  # thinner shapes are a few pixels of anti-aliased edge, not a recognisable shape
ASPECT_RANGE = {"rectangle": (0.35, 2.8), "triangle": (0.6, 1.7), "circle": (1.0, 1.0)}  # width / height
MAX_ANGLE = 15.0  # degrees; a triangle still points up, a rectangle is still read as one
BACKGROUND_SATURATION = (0.0, 0.12)
BACKGROUND_VALUE = (0.88, 1.0)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    centre: tuple[float, float]  # (x, y) in pixels
    width: float  # of the unrotated shape, px
    height: float
    angle: float  # degrees, counter-clockwise
    background: tuple[int, int, int]
    antialias: bool = True


def pale_background(rng: random.Random) -> tuple[int, int, int]:
    """A pale tint of any hue (low saturation, high value)."""
    hue = rng.random()
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*BACKGROUND_SATURATION), rng.uniform(*BACKGROUND_VALUE))
    return tuple(int(round(255 * c)) for c in rgb)  # type: ignore[return-value]


def _extent(width: float, height: float, angle: float) -> tuple[float, float]:
    """Half width and half height of the axis-aligned box around a rotated width x height box."""
    a = math.radians(angle)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    return (width * c + height * s) / 2, (width * s + height * c) / 2


def random_scene(rng: random.Random, colour: str | None = None, shape: str | None = None,
                 image_size: int = IMAGE_SIZE) -> Scene:
    """A scene with the given (or a random) colour and shape and everything else drawn from `rng`."""
    colour = colour if colour is not None else rng.choice(COLOURS)
    shape = shape if shape is not None else rng.choice(SHAPES)
    if colour not in PALETTE or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape {colour!r}/{shape!r} (colours: {', '.join(COLOURS)}; "
                         f"shapes: {', '.join(SHAPES)}).")
    lo, hi = ASPECT_RANGE[shape]
    aspect = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    longer = rng.uniform(*SIZE_RANGE) * image_size / IMAGE_SIZE
    width, height = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
    width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
    angle = 0.0 if shape == "circle" else rng.uniform(-MAX_ANGLE, MAX_ANGLE)
    half_w, half_h = _extent(width, height, angle)
    margin = 1.0
    cx = rng.uniform(half_w + margin, image_size - half_w - margin)
    cy = rng.uniform(half_h + margin, image_size - half_h - margin)
    return Scene(colour, shape, (cx, cy), width, height, angle, pale_background(rng), rng.random() < 0.5)


def outline(scene: Scene) -> list[tuple[float, float]]:
    """The shape's polygon in pixel coordinates (a circle as 64 points)."""
    w, h = scene.width / 2, scene.height / 2
    if scene.shape == "rectangle":
        points = [(-w, -h), (w, -h), (w, h), (-w, h)]
    elif scene.shape == "triangle":  # isosceles, apex up (y grows downwards)
        points = [(0.0, -h), (w, h), (-w, h)]
    else:
        points = [(w * math.cos(t), h * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    a = math.radians(scene.angle)
    c, s = math.cos(a), math.sin(a)
    cx, cy = scene.centre
    # Counter-clockwise on screen: y points down, so the rotation's sine flips sign.
    return [(cx + x * c + y * s, cy - x * s + y * c) for x, y in points]


def coverage(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) float32 alpha in [0, 1]: how much of each pixel the shape covers (anti-aliased), or 0/1 by
    whether it covers at least half the pixel (aliased, so the shape's area stays right)."""
    mask = Image.new("L", (image_size * SUPERSAMPLE, image_size * SUPERSAMPLE), 0)
    # PIL puts integer coordinates at sample centres; a sample covers [k, k + 1) of the scaled plane.
    points = [(x * SUPERSAMPLE - 0.5, y * SUPERSAMPLE - 0.5) for x, y in outline(scene)]
    ImageDraw.Draw(mask).polygon(points, fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return alpha if scene.antialias else (alpha >= 0.5).astype(np.float32)


def composite(alpha: np.ndarray, colour: tuple[int, int, int], background: tuple[int, int, int]
              ) -> Image.Image:
    """alpha (H, W) -> RGB image: alpha * colour + (1 - alpha) * background, rounded."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]  # (H, W, 1)
    rgb = a * np.asarray(colour, np.float32) + (1 - a) * np.asarray(background, np.float32)
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def draw(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as a (image_size x image_size) RGB image."""
    return composite(coverage(scene, image_size), PALETTE[scene.colour], scene.background)


# ------------------------------------------------------------------------------------------- questions

# The three kinds easy-VQA asks (colour, shape, yes/no about a colour or a shape, half of them negated), in
# our own templates. {colour} / {shape} name the image's own colour or shape, {probe} the one asked about.
COLOUR_QUESTIONS = ("what color is the shape?", "what is the color of the shape?",
                    "what color is the {shape}?", "what is the color of the {shape}?")
SHAPE_QUESTIONS = ("what shape is in the image?", "what shape is present?",
                   "what shape does the image contain?", "what is the {colour} shape?")
PROBE_COLOUR = ("is there a {probe} shape?", "is there a {probe} shape in the image?",
                "is a {probe} shape present?", "does the image contain a {probe} shape?")
PROBE_COLOUR_NOT = ("is there not a {probe} shape?", "is no {probe} shape present?",
                    "does the image not contain a {probe} shape?",
                    "is there not a {probe} shape in the image?")
PROBE_SHAPE = ("is there a {probe}?", "is there a {probe} in the image?", "is a {probe} present?",
               "does the image contain a {probe}?")
PROBE_SHAPE_NOT = ("is there not a {probe}?", "is no {probe} present?",
                   "does the image not contain a {probe}?", "is there not a {probe} in the image?")


@dataclass(frozen=True)
class ShapeQuestion:
    question: str
    answer: str
    kind: str  # "colour", "shape" or "yes/no"


def colour_question(scene: Scene, rng: random.Random) -> ShapeQuestion:
    return ShapeQuestion(rng.choice(COLOUR_QUESTIONS).format(shape=scene.shape), scene.colour, "colour")


def shape_question(scene: Scene, rng: random.Random) -> ShapeQuestion:
    return ShapeQuestion(rng.choice(SHAPE_QUESTIONS).format(colour=scene.colour), scene.shape, "shape")


def yes_no_question(scene: Scene, rng: random.Random) -> ShapeQuestion:
    """About a colour or a shape (even odds), true half the time, negated half the time."""
    about_colour = rng.random() < 0.5
    own, choices = (scene.colour, COLOURS) if about_colour else (scene.shape, SHAPES)
    probe = own if rng.random() < 0.5 else rng.choice([c for c in choices if c != own])
    negated = rng.random() < 0.5
    templates = {(True, False): PROBE_COLOUR, (True, True): PROBE_COLOUR_NOT,
                 (False, False): PROBE_SHAPE, (False, True): PROBE_SHAPE_NOT}[about_colour, negated]
    holds = (probe == own) != negated
    return ShapeQuestion(rng.choice(templates).format(probe=probe), "yes" if holds else "no", "yes/no")


QUESTION_KINDS = {"colour": colour_question, "shape": shape_question, "yes/no": yes_no_question}


def questions(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = ("colour", "shape", "yes/no")
              ) -> list[ShapeQuestion]:
    """One question per entry of `kinds` (a kind may repeat), about `scene`."""
    return [QUESTION_KINDS[k](scene, rng) for k in kinds]


def balanced_labels(count: int) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs: colours in turn, shapes shifting by one every 8 images, so every
    24 in a row hold each combination once and any count spreads colours and shapes evenly."""
    return [(COLOURS[i % 8], SHAPES[(i % 8 + i // 8) % 3]) for i in range(count)]


# --------------------------------------------------------------------------------------------- image sets


@dataclass(frozen=True)
class RenderedImage:
    image: str  # file name inside the set's folder
    colour: str
    shape: str
    questions: tuple[ShapeQuestion, ...]


def render_set(folder: str | os.PathLike, labels: Sequence[tuple[str, str]], seed: str,
               kinds: tuple[str, ...] = ("colour", "shape", "yes/no"), start: int = 0) -> list[RenderedImage]:
    """Draw one image per (colour, shape) in `labels` into `folder` as NNNNN.png (numbered from `start`) and
    ask `kinds` about each. Image i depends only on (`seed`, i), so a longer set begins with a shorter one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (colour, shape) in enumerate(labels, start):
        rng = random.Random(f"{seed}:{i}")  # str seeds are hashed with SHA-512: stable across runs
        scene = random_scene(rng, colour, shape)
        name = f"{i:05d}.png"
        draw(scene).save(folder / name)
        out.append(RenderedImage(name, colour, shape, tuple(questions(scene, rng, kinds))))
    return out
