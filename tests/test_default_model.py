"""The embedded default model: loads offline from the packages, answers easy-VQA, captions, retrieves."""

from __future__ import annotations

import json
import random
from collections import Counter
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


def test_a_runaway_prompt_fails_at_once(model, monkeypatch):
    monkeypatch.setattr(model.model, "generate", lambda *a, **k: pytest.fail("generated past the prompt cap"))
    with pytest.raises(ValueError, match=r"prompt is 5005 tokens, more than max_prompt_tokens=512"):
        model.ask("examples/easy-vqa-test-0.png", "what " * 5000)


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
    small = ["--limit-images", "20", "--views", "2", "--rendered", "24"]
    argv = ["--work", str(tmp_path), "--device", "cuda", "--resume", *small, "--stage2", "steps=7"]
    assert default_model.main(argv) == 0
    assert [name for name, _ in calls] == ["cache-features", "stage1", "stage2", "stage1"]
    assert calls[0][1][calls[0][1].index("--device") + 1] == "cuda"
    for (_, argv), config, start in zip(calls[1:], ("default_stage1", "default_stage2", "default_refit"),
                                        (None, "stage1", "stage2")):
        assert argv[1].endswith(f"{config}.yaml") and "--resume" in argv and "device=cuda" in argv
        inits = [a for a in argv if a.startswith("init_from=")]
        assert inits == ([f"init_from={tmp_path / start / 'final'}"] if start else [])
    assert calls[2][1][-1] == "steps=7" and "steps=7" not in calls[1][1] + calls[3][1]
    assert "data.augment=false" in calls[1][1]  # the augmentation is in the image files the cache holds
    images = 20 * 3 + 24  # originals, two views of each, rendered
    asked = sum(q.image_id < 20 for q in easy_vqa.questions("train"))
    stage2 = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    # Questions (an original's also for its views; ten per rendered image), then per image a caption and
    # four chat turns.
    assert len(stage2) == 3 * asked + 24 * 10 + images * 5
    assert sum("history" in r for r in stage2) == 3 * images


def test_start_from_continues_stage_2_from_a_model_and_skips_stage_1(tmp_path, monkeypatch):
    """--start-from: the fine-tune plan (cache, stage 2 from the given model, re-fit from stage 2's final);
    a folder without a model is refused with one line."""
    import blip2.recipes
    from blip2.recipes import default_model

    calls = []
    monkeypatch.setattr(blip2.recipes, "run_recipe", lambda name, argv: calls.append((name, argv)) or 0)
    monkeypatch.setattr(default_model, "export", lambda folder: folder)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    small = ["--limit-images", "4", "--views", "0", "--rendered", "8"]
    assert default_model.main(["--work", str(tmp_path / "w"), *small, "--start-from", str(model)]) == 0
    assert [name for name, _ in calls] == ["cache-features", "stage2", "stage1"]
    assert [a for a in calls[1][1] if a.startswith("init_from=")] == [f"init_from={model}"]
    assert "language=null" in calls[1][1]  # a stage-2 model brings its LLM
    assert [a for a in calls[2][1] if a.startswith("init_from=")] == [f"init_from={tmp_path / 'w' / 'stage2' / 'final'}"]
    with pytest.raises(SystemExit) as exit_:
        default_model.main(["--work", str(tmp_path / "w"), *small, "--start-from", str(tmp_path / "nothing")])
    assert exit_.value.code == 2


def test_write_data_adds_augmented_views_and_rendered_images(tmp_path):
    from PIL import Image

    from blip2.data import shape_augment, shapes
    from blip2.recipes import default_model

    files = default_model.write_data(tmp_path, views=2, rendered=24, limit=8)
    captions = [json.loads(line) for line in files["captions"].read_text().splitlines()]
    names = [c["image"] for c in captions]
    assert sum(n.startswith("easy-vqa/") for n in names) == 8
    assert sum(n.startswith("augmented/") for n in names) == 16
    assert sum(n.startswith("rendered/") for n in names) == 24
    texts = easy_vqa.all_caption_texts()
    for c in captions:  # the file is there and shows the caption's colour
        colour = c["text"].split()[1]
        assert texts[c["image_id"]] == c["text"]
        with Image.open(files["images"] / c["image"]) as im:
            assert shape_augment.layers(im.convert("RGB"))[1] == shapes.PALETTE[colour], c
    stage2 = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    by_image: dict[str, list] = {}
    for r in stage2:
        if r["question"] and "history" not in r:
            by_image.setdefault(r["image"], []).append((r["question"], r["answers"]))
    first = next(n for n in names if n.startswith("easy-vqa/"))
    stem = first.split("/")[1].removesuffix(".png")
    expected = [(q.question, [q.answer]) for q in easy_vqa.questions("train") if q.image_id == int(stem)]
    for name in (first, f"augmented/{stem}-0.png", f"augmented/{stem}-1.png"):  # then a chat opener
        assert by_image[name][: len(expected)] == expected and len(by_image[name]) == len(expected) + 1
    rendered = by_image["rendered/00000.png"][:10]  # then a chat opener
    kinds = [easy_vqa.question_type(answers[0]) for _, answers in rendered]
    assert kinds.count("colour") == 3 and kinds.count("shape") == 2 and kinds.count("yes/no") == 5
    # A second call reuses the drawn images (the manifest matches) and writes the same records.
    before = (files["images"] / "rendered" / "00000.png").stat().st_mtime_ns
    again = default_model.write_data(tmp_path, views=2, rendered=24, limit=8)
    assert again["stage2"].read_text() == files["stage2"].read_text()
    assert (files["images"] / "rendered" / "00000.png").stat().st_mtime_ns == before


def test_repeat_writes_a_colours_stage_2_records_n_times(tmp_path):
    """--repeat brown=3: every stage-2 record of a brown image three times, the rest once, the same images and
    captions; a bad value is one usage line."""
    from blip2.recipes import default_model

    plain = default_model.write_data(tmp_path / "a", views=1, rendered=16, limit=4)
    once = [json.loads(line) for line in plain["stage2"].read_text().splitlines()]
    captions = plain["captions"].read_text()
    files = default_model.write_data(tmp_path / "b", views=1, rendered=16, limit=4, repeat={"brown": 3})
    repeated = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    assert files["captions"].read_text() == captions
    colour = {json.loads(line)["image"]: json.loads(line)["text"].split()[1] for line in captions.splitlines()}
    brown = [r for r in once if colour[r["image"]] == "brown"]
    assert brown and len(repeated) == len(once) + 2 * len(brown)
    assert [r for r in repeated if colour[r["image"]] != "brown"] == [r for r in once if colour[r["image"]] != "brown"]
    counts = Counter(json.dumps(r, sort_keys=True) for r in repeated if colour[r["image"]] == "brown")
    assert counts == Counter({k: 3 * n for k, n in Counter(json.dumps(r, sort_keys=True) for r in brown).items()})
    for bad in ("brown", "purple=2", "brown=0", "brown=x"):
        with pytest.raises(SystemExit) as exit_:
            default_model.main(["--work", str(tmp_path / "c"), "--repeat", bad])
        assert exit_.value.code == 2


def test_a_stale_feature_cache_is_rebuilt(tmp_path):
    from blip2.recipes import default_model

    files = default_model.write_data(tmp_path, views=1, rendered=3, limit=2)
    cache = tmp_path / "features-train"
    cache.mkdir()
    keys = [json.loads(line)["image"] for line in files["captions"].read_text().splitlines()]
    (cache / "index.json").write_text(json.dumps({"keys": keys[:-1]}))  # an older run's, without a render
    assert not default_model._cache_covers(cache, files["captions"])
    (cache / "index.json").write_text(json.dumps({"keys": keys}))
    assert default_model._cache_covers(cache, files["captions"])


@pytest.mark.slow
def test_a_tiny_default_model_run_trains_on_views_and_renders(tmp_path):
    """The whole pipeline on CPU with tiny stages: data (originals, views, renders), the EfficientNet feature
    cache of all of them, stage 1, stage 2 and the re-fit, with a tiny Q-Former and a tiny random LLM."""
    import sys

    from blip2.data.feature_cache import FeatureCache
    from blip2.recipes import default_model

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models as tm

    tm.word_tokenizer("llama").save_pretrained(tmp_path / "llm-tokenizer")
    short = ["batch_size=4", "warmup_steps=1", "log_every=1", "save_every=2"]
    qformer = ["qformer_init=null", "model.qformer.hidden_size=32", "model.qformer.num_hidden_layers=2",
               "model.qformer.num_attention_heads=4", "model.qformer.intermediate_size=37",
               "model.image_text_hidden_size=16", "model.num_query_tokens=4"]
    llm = [f"tokenizer={tmp_path / 'llm-tokenizer'}", "language.pretrained=null", "language.gguf_file=null",
           *(f"language.hf_config.{k}={v}" for k, v in (("hidden_size", 32), ("intermediate_size", 37),
                                                         ("num_hidden_layers", 1), ("num_attention_heads", 4),
                                                         ("num_key_value_heads", 2), ("vocab_size", 64)))]
    work = tmp_path / "work"
    code = default_model.main(["--work", str(work), "--limit-images", "4", "--views", "1", "--rendered", "4",
                               "--skip-export", "--stage1", "steps=2", *short, *qformer,
                               "--stage2", "steps=2", *short, *llm, "--refit", "steps=1", *short])
    assert code == 0
    cache = FeatureCache(work / "features-train")
    assert len(cache) == 4 + 4 + 4 and cache["rendered/00003.png"].shape == (49, 1280)
    assert {k.split("/")[0] for k in cache.keys} == {"easy-vqa", "augmented", "rendered"}
    for stage in ("stage1", "stage2", "refit"):
        assert (work / stage / "final" / "model.safetensors").is_file()
