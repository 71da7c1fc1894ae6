"""Our renderer of easy-VQA-like images: deterministic; its labels and answers are what the pixels show."""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from blip2.data import shapes

# Area of each shape over its unrotated width x height box.
FILL = {"rectangle": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [shapes.random_scene(rng, c, s) for c, s in shapes.balanced_labels(n)]


def test_a_seed_fixes_the_set_and_a_longer_set_starts_with_a_shorter_one(tmp_path):
    labels = shapes.balanced_labels(10)
    a = shapes.render_set(tmp_path / "a", labels, "seed-1")
    b = shapes.render_set(tmp_path / "b", labels[:6], "seed-1")
    c = shapes.render_set(tmp_path / "c", labels, "seed-2")
    assert a[:6] == b
    for x, y in zip(a[:6], b):
        assert (tmp_path / "a" / x.image).read_bytes() == (tmp_path / "b" / y.image).read_bytes()
    assert sum((tmp_path / "a" / x.image).read_bytes() != (tmp_path / "c" / y.image).read_bytes()
               for x, y in zip(a, c)) == 10


def test_the_commonest_shape_pixel_is_the_labels_colour_and_every_pixel_a_blend():
    for scene in _scenes(96):
        arr = np.asarray(shapes.draw(scene), dtype=np.int64).reshape(-1, 3)
        bg, colour = np.asarray(scene.background), np.asarray(shapes.PALETTE[scene.colour])
        shape_pixels = arr[np.abs(arr - bg).sum(-1) > 60]
        values, counts = np.unique(shape_pixels, axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == shapes.PALETTE[scene.colour], scene
        # alpha * colour + (1 - alpha) * background, rounded: no pixel leaves that segment.
        d = colour - bg
        alpha = np.clip(((arr - bg) @ d) / (d @ d), 0, 1)[:, None]
        assert np.abs(arr - (bg + alpha * d)).max() <= 1.5, scene


def test_backgrounds_are_pale_and_vary():
    backgrounds = [s.background for s in _scenes(200)]
    assert min(min(b) for b in backgrounds) >= 0.88 * 0.88 * 255 - 1
    assert len(set(backgrounds)) > 150


def test_each_shape_covers_its_own_share_of_its_box():
    """Covered area / (width x height): 1 for a rectangle, pi/4 for a circle, 1/2 for a triangle; the
    nearest of the three is the label for every scene, rotated, tiny or without anti-aliasing."""
    aliased = [dataclasses.replace(s, antialias=False) for s in _scenes(72, seed=2)]
    for scene in _scenes(240, seed=1) + aliased:
        ratio = float(shapes.coverage(scene).sum()) / (scene.width * scene.height)
        nearest = min(FILL, key=lambda s: abs(FILL[s] - ratio))
        assert nearest == scene.shape, (scene, ratio)


def test_shapes_stay_inside_the_image_and_sizes_and_angles_vary():
    scenes = _scenes(240, seed=3)
    for scene in scenes:
        alpha = shapes.coverage(scene)
        edge = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert edge.max() < 0.5, scene
    sizes = [max(s.width, s.height) for s in scenes]
    assert min(sizes) < 14 and max(sizes) > 40
    angles = [s.angle for s in scenes if s.shape != "circle"]
    assert min(angles) < -10 and max(angles) > 10
    assert all(s.angle == 0 and s.width == s.height for s in scenes if s.shape == "circle")


def test_balanced_labels():
    labels = shapes.balanced_labels(200)
    assert len(set(labels[:24])) == 24 and len(set(labels[24:48])) == 24
    assert set(Counter(c for c, _ in labels).values()) == {25}
    assert sorted(Counter(s for _, s in labels).values()) == [66, 67, 67]


def _expected_yes_no(question: str, colour: str, shape: str) -> str:
    words = re.findall(r"[a-z]+", question)
    named = [w for w in words if w in shapes.COLOURS or w in shapes.SHAPES]
    assert len(named) == 1, question
    holds = named[0] in (colour, shape)
    return "yes" if holds != ("not" in words or "no" in words) else "no"


def test_questions_are_answered_by_the_labels():
    rng = random.Random(4)
    answers = Counter()
    for scene in _scenes(300, seed=4):
        colour_q, shape_q, yes_no = shapes.questions(scene, rng)
        assert colour_q.answer == scene.colour and colour_q.kind == "colour"
        assert shape_q.answer == scene.shape and shape_q.kind == "shape"
        # A question names the image's own shape or colour, never another one.
        assert set(re.findall(r"[a-z]+", colour_q.question)) & set(shapes.SHAPES) <= {scene.shape}
        assert set(re.findall(r"[a-z]+", shape_q.question)) & set(shapes.COLOURS) <= {scene.colour}
        assert yes_no.answer == _expected_yes_no(yes_no.question, scene.colour, scene.shape), yes_no
        answers[yes_no.answer, "not" in yes_no.question or " no " in yes_no.question] += 1
    assert len(answers) == 4 and min(answers.values()) > 40  # yes/no, negated or not, all common


def test_unknown_labels_are_refused():
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.random_scene(random.Random(0), "purple", "circle")


def test_easy_vqa_draws_the_same_colours():
    """The palette is easy-VQA's: the commonest shape pixel of its train images is their label's RGB."""
    from blip2.eval import easy_vqa

    labels = easy_vqa.image_labels("train")
    paths = {q.image_id: q.image for q in easy_vqa.questions("train")}
    seen = set()
    for image_id in sorted(labels)[:80]:
        colour, _ = labels[image_id]
        arr = np.asarray(Image.open(paths[image_id]).convert("RGB"), dtype=np.int64).reshape(-1, 3)
        values, counts = np.unique(arr, axis=0, return_counts=True)
        background = values[counts.argmax()]
        far = arr[np.abs(arr - background).sum(-1) > 60]
        values, counts = np.unique(far, axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == shapes.PALETTE[colour]
        seen.add(colour)
    assert seen == set(shapes.COLOURS)
