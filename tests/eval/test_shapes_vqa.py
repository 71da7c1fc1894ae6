"""`shapes-vqa:test`: the name resolves to 600 fixed questions about 200 rendered images; the breakdown."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from blip2.data import shapes
from blip2.eval import datasets, shapes_vqa


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path))
    return tmp_path


def test_the_name_resolves_to_a_fixed_balanced_set(cache):
    items = datasets.load("vqa", ["shapes-vqa:test"])
    assert len(items) == 600 and len({it.image for it in items}) == 200
    assert Counter(it.question_type for it in items) == {"colour": 200, "shape": 200, "yes/no": 200}
    assert {it.answer_type for it in items if it.question_type == "yes/no"} == {"yes/no"}
    labels = shapes_vqa.labels("test")
    assert set(Counter(c for c, _ in labels.values()).values()) == {25}
    for it in items[:30]:  # what the colour questions expect is the colour the image shows
        colour, shape = labels[it.image]
        if it.question_type == "colour":
            arr = np.asarray(Image.open(it.image).convert("RGB"), dtype=np.int64).reshape(-1, 3)
            values, counts = np.unique(arr, axis=0, return_counts=True)
            background = values[counts.argmax()]
            far = arr[np.abs(arr - background).sum(-1) > 60]
            values, counts = np.unique(far, axis=0, return_counts=True)
            assert it.answers == [colour] and tuple(values[counts.argmax()]) == shapes.PALETTE[colour]
        if it.question_type == "shape":
            assert it.answers == [shape]
    # Rendered once: a second load reuses the files (same bytes, untouched).
    png = cache / "shapes-vqa" / f"test-v{shapes_vqa.VERSION}" / "images" / "00000.png"
    first = png.stat().st_mtime_ns
    again = datasets.load("vqa", ["shapes-vqa:test"], limit=5)
    assert [it.question for it in again] == [it.question for it in items[:5]]
    assert png.stat().st_mtime_ns == first


def test_the_same_set_in_another_cache(cache, tmp_path_factory, monkeypatch):
    a = datasets.load("vqa", ["shapes-vqa:test"], limit=9)
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path_factory.mktemp("other")))
    b = datasets.load("vqa", ["shapes-vqa:test"], limit=9)
    assert [(x.question, x.answers) for x in a] == [(y.question, y.answers) for y in b]
    assert all(open(x.image, "rb").read() == open(y.image, "rb").read() for x, y in zip(a, b))


def test_wrong_splits_and_tasks_are_one_clear_error(cache):
    with pytest.raises(ValueError, match="shapes-vqa:test"):
        datasets.load("vqa", ["shapes-vqa:train"])
    with pytest.raises(ValueError, match="blip2 eval vqa"):
        datasets.load("caption", ["shapes-vqa:test"])


def test_breakdown_per_colour_shape_and_confusions(cache, tmp_path):
    items = datasets.load("vqa", ["shapes-vqa:test"])
    labels = shapes_vqa.labels("test")
    rows = []
    for it in items:  # every gray image's colour question answered "black", the rest right
        colour, _ = labels[it.image]
        wrong = it.question_type == "colour" and colour == "gray"
        rows.append({"image": it.image, "question": it.question, "answers": it.answers,
                     "prediction": "black" if wrong else it.answers[0], "question_type": it.question_type})
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shapes_vqa.main([str(run)]) == 0
    result = json.loads((run / "breakdown.json").read_text())
    assert result["colour_questions_per_colour"]["gray"] == {"accuracy": 0.0, "questions": 25}
    assert result["colour_questions_per_colour"]["black"]["accuracy"] == 100.0
    assert result["per_image_colour"]["gray"] == {"accuracy": round(100 * 50 / 75, 2), "questions": 75}
    assert result["wrong"] == {"colour": {"gray -> black": 25}, "shape": {}, "yes/no": {}}
    assert "| gray | 66.67 (75) | 0.00 (25) |" in (run / "breakdown.md").read_text()
    assert shapes_vqa.main([str(tmp_path / "missing")]) == 1
