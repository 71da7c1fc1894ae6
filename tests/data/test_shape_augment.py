"""Colour- and shape-preserving augmentation: new geometry and background, the shape's colour untouched."""

from __future__ import annotations

import colorsys
import random

import numpy as np
import pytest
from PIL import Image

from blip2.data import shape_augment, shapes
from blip2.eval import easy_vqa


@pytest.fixture(scope="module")
def originals():
    """Six easy-VQA train images of each colour (each shape among them), with their labels."""
    labels = easy_vqa.image_labels("train")
    paths = {q.image_id: q.image for q in easy_vqa.questions("train")}
    picked: dict[str, list] = {c: [] for c in shapes.COLOURS}
    for image_id in sorted(labels):
        colour, shape = labels[image_id]
        if len(picked[colour]) < 6:
            with Image.open(paths[image_id]) as im:
                picked[colour].append((im.convert("RGB"), colour, shape))
    return [item for items in picked.values() for item in items]


def _hue_class(rgb) -> str:
    """The palette colour whose hue / saturation / value is nearest (hue on the circle)."""
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in rgb))

    def distance(name):
        ph, ps, pv = colorsys.rgb_to_hsv(*(x / 255 for x in shapes.PALETTE[name]))
        dh = min(abs(h - ph), 1 - abs(h - ph)) if s > 0.2 and ps > 0.2 else 0.0
        return dh * 4 + abs(s - ps) + abs(v - pv)

    return min(shapes.COLOURS, key=distance)


def test_the_hue_stays_in_its_colour_class(originals):
    """Every view: the dominant shape colour is exactly the label's RGB (so its hue class is the label),
    and every pixel is a blend of that colour and the background: nothing moved any pixel's hue."""
    rng = random.Random(0)
    for image, colour, shape in originals:
        for _ in range(3):
            view = shape_augment.augment(image, rng, shape, colour)
            alpha, rgb, background = shape_augment.layers(view)  # colour read off the view, not given
            assert rgb == shapes.PALETTE[colour] and _hue_class(rgb) == colour
            arr = np.asarray(view, dtype=np.float64)
            bg, c = np.asarray(background, float), np.asarray(rgb, float)
            assert np.abs(arr - (bg + alpha[..., None] * (c - bg))).max() <= 1.5
            assert (alpha > 0.99).sum() >= 4  # a solid interior, not only edge pixels


def test_size_position_background_and_angle_change(originals):
    rng = random.Random(1)
    moved = grew = shrank = rotated = hard = 0
    backgrounds = set()
    for image, colour, shape in originals:
        before, _, bg_before = shape_augment.layers(image, shapes.PALETTE[colour])
        view = shape_augment.augment(image, rng, shape, colour)
        after, _, bg_after = shape_augment.layers(view, shapes.PALETTE[colour])
        backgrounds.add(bg_after)
        hard += len(np.unique(np.asarray(view).reshape(-1, 3), axis=0)) == 2
        ys0, xs0 = np.nonzero(before > 0.5)
        ys1, xs1 = np.nonzero(after > 0.5)
        moved += abs(ys0.mean() - ys1.mean()) + abs(xs0.mean() - xs1.mean()) > 3
        grew += after.sum() > 1.3 * before.sum()
        shrank += after.sum() < 0.7 * before.sum()
        if shape == "rectangle":  # a rotated rectangle no longer fills its axis-aligned box
            box = (ys1.max() - ys1.min() + 1) * (xs1.max() - xs1.min() + 1)
            rotated += (after > 0.5).sum() < 0.9 * box
    assert len(backgrounds) > 0.9 * len(originals)
    assert moved > 0.7 * len(originals) and grew > 5 and shrank > 5 and rotated > 3
    assert 0.25 * len(originals) < hard < 0.75 * len(originals)  # aliased edges: only two colours


def test_circles_stay_round_and_cut_shapes_stay_put(originals):
    rng = random.Random(2)
    for image, colour, shape in originals:
        if shape != "circle":
            continue
        view = shape_augment.augment(image, rng, shape, colour)
        alpha, _, _ = shape_augment.layers(view, shapes.PALETTE[colour])
        ys, xs = np.nonzero(alpha > 0.5)
        if ys.min() > 0 and xs.min() > 0 and ys.max() < 63 and xs.max() < 63:
            assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1
    # A triangle cut by the bottom edge: moved inwards it would be a trapezoid.
    scene = shapes.Scene("red", "triangle", (32.0, 60.0), 20.0, 16.0, 0.0, (240, 240, 240))
    cut = shapes.draw(scene)
    view = shape_augment.augment(cut, random.Random(3), "triangle", "red")
    before, after = shape_augment.layers(cut)[0] >= 0.5, shape_augment.layers(view)[0] >= 0.5
    assert before.sum() > 50 and (before != after).sum() <= 2
    assert shape_augment.layers(view)[2] != (240, 240, 240)


def test_augment_is_deterministic_and_works_on_rendered_images():
    scene = shapes.random_scene(random.Random(5), "teal", "rectangle")
    image = shapes.draw(scene)
    a = shape_augment.augment(image, random.Random(9), "rectangle", "teal")
    b = shape_augment.augment(image, random.Random(9), "rectangle")  # colour read off the image
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert shape_augment.layers(a)[1] == shapes.PALETTE["teal"]


def test_an_image_without_a_shape_is_refused():
    with pytest.raises(ValueError, match="no shape"):
        shape_augment.augment(Image.new("RGB", (64, 64), (240, 240, 240)), random.Random(0), "circle")
