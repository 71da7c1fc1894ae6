"""The embedded default model: loads offline from the packages, answers easy-VQA, captions, retrieves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import blip2
from blip2.eval import easy_vqa
from blip2.eval.metrics.vqa import vqa_score

BUNDLED = Path(blip2.__file__).resolve().parent / "default" / "config.json"


@pytest.fixture(scope="module")
def model():
    if not BUNDLED.exists():
        pytest.skip("the default model is not bundled (make default-model)")
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


def test_make_default_model_chains_the_stages(tmp_path, monkeypatch):
    """The pipeline's plan without its compute: cache, then stage 1 -> stage 2 -> re-fit, each starting from
    the previous `final`, with the per-stage overrides and the device passed through. Runs without the bundle."""
    import blip2.recipes
    from blip2.recipes import default_model

    calls = []
    monkeypatch.setattr(blip2.recipes, "run_recipe", lambda name, argv: calls.append((name, argv)) or 0)
    monkeypatch.setattr(default_model, "export", lambda folder: folder)
    assert default_model.main(["--work", str(tmp_path), "--device", "cuda", "--resume", "--stage2", "steps=7"]) == 0
    assert [name for name, _ in calls] == ["cache-features", "stage1", "stage2", "stage1"]
    assert calls[0][1][calls[0][1].index("--device") + 1] == "cuda"
    for (_, argv), config, start in zip(calls[1:], ("default_stage1", "default_stage2", "default_refit"),
                                        (None, "stage1", "stage2")):
        assert argv[1].endswith(f"{config}.yaml") and "--resume" in argv and "device=cuda" in argv
        inits = [a for a in argv if a.startswith("init_from=")]
        assert inits == ([f"init_from={tmp_path / start / 'final'}"] if start else [])
    assert calls[2][1][-1] == "steps=7" and "steps=7" not in calls[1][1] + calls[3][1]
    stage2 = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    assert len(stage2) == 38_575 + 4_000 * 5  # questions, then per image a caption and four chat turns
    assert sum("history" in r for r in stage2) == 3 * 4_000
