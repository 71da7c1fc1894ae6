"""The embedded default model: loads offline from the packages, answers easy-VQA, captions, retrieves."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import blip2
from blip2.eval import easy_vqa
from blip2.eval.metrics.vqa import vqa_score

BUNDLED = Path(blip2.__file__).resolve().parent / "default" / "config.json"
pytestmark = pytest.mark.skipif(not BUNDLED.exists(), reason="the default model is not bundled yet (make default-model)")


@pytest.fixture(scope="module")
def model():
    return blip2.load("default", batch_size=16)


def test_loads_offline_from_packages(model):
    cfg = model.model.config
    assert cfg.vision.kind == "efficientnet_lite0" and cfg.language.gguf_file
    assert model.tokenizer is not None and model.qformer_tokenizer is not None


def test_vqa_regression(model):
    """A fixed sample of 300 test questions: >= 97% accuracy (the issue's bar for the full split is 99%)."""
    qs = random.Random(0).sample(easy_vqa.questions("test"), 300)
    by_image: dict[str, list] = {}
    for q in qs:
        by_image.setdefault(q.image, []).append(q)
    correct = 0.0
    for image, group in by_image.items():
        answers = model.ask(image, [q.question for q in group], num_beams=1, max_new_tokens=4)
        correct += sum(vqa_score(a, [q.answer]) for a, q in zip(answers, group))
    assert correct / len(qs) >= 0.97


def test_caption_regression(model):
    labels = easy_vqa.image_labels("test")
    paths = {q.image_id: q.image for q in easy_vqa.questions("test")}
    ids = sorted(labels)[:50]
    captions = model.caption([paths[i] for i in ids], num_beams=1, max_new_tokens=6)
    right = 0
    for i, caption in zip(ids, captions):
        colours, shapes = easy_vqa.mentioned(caption)
        right += colours == {labels[i][0]} and shapes == {labels[i][1]}
    assert right / len(ids) >= 0.95


def test_chat_follow_up(model):
    """'what shape is this?' then 'what color is it?' in one session, on 20 test images."""
    from blip2.eval.datasets import load_chat

    right = 0
    for item in load_chat(["easy-vqa-chat:test"], limit=20):
        session = model.chat(item.image, num_beams=1, max_new_tokens=4)
        right += all(vqa_score(session.ask(q), answers) == 1 for q, answers in item.turns)
    assert right >= 19


def test_retrieve_finds_the_named_shapes(model):
    labels = easy_vqa.image_labels("test")
    paths = {q.image_id: q.image for q in easy_vqa.questions("test")}
    ids = sorted(labels)[:200]
    blue_triangles = {k for k, i in enumerate(ids) if labels[i] == ("blue", "triangle")}
    assert len(blue_triangles) >= 3
    (matches,) = model.retrieve("a blue triangle", [paths[i] for i in ids], k=len(blue_triangles))
    assert {m.index for m in matches} == blue_triangles
