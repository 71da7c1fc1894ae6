"""Training data: annotation readers, LAVIS text processing, unreadable images skipped and counted, the
world-size-independent sampler."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import write_images, write_pairs, write_vqa
from blip2.data.datasets import (
    DatasetError,
    ImageTextDataset,
    VQADataset,
    build_dataset,
    collate,
    pre_caption,
    pre_question,
    read_coco_captions,
    read_vqav2,
)
from blip2.models.config import ImageConfig
from blip2.training.sampler import GlobalBatchSampler, make_loader, micro_batches

IMAGE = ImageConfig(size=16)


def test_text_processing_follows_lavis():
    assert pre_caption("A Dog; on the  GRASS!\n") == "a dog on the grass"
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert pre_question("What colour is it? (Really.)") == "what colour is it? really"


def test_pairs_dataset(tmp_path):
    ds = build_dataset("pairs", write_pairs(tmp_path, 4), tmp_path, IMAGE)
    assert isinstance(ds, ImageTextDataset) and len(ds) == 4
    item = ds[(0, 1)]
    assert item["pixels"].shape == (3, 16, 16) and item["skipped"] == 0 and item["index"] == 1
    assert item["text"] in ("a green circle", "a photo of a green circle")
    assert torch.equal(ds[(3, 2)]["pixels"], ds[(3, 2)]["pixels"])  # an item is a function of (epoch, index)
    assert not torch.equal(ds[(0, 2)]["pixels"], ds[(1, 2)]["pixels"])  # a new crop every epoch
    batch = collate([ds[(0, i)] for i in range(3)])
    assert batch["pixels"].shape == (3, 3, 16, 16) and batch["image_id"].tolist() == [0, 1, 2]
    assert len(batch["text"]) == 3 and batch["skipped"] == 0


def test_coco_captions(tmp_path):
    images = write_images(tmp_path, 2)
    coco = {"images": [{"id": 7, "file_name": images[0][0]}, {"id": 9, "file_name": images[1][0]}],
            "annotations": [{"image_id": 7, "caption": "A red circle."}, {"image_id": 7, "caption": "Red."},
                            {"image_id": 9, "caption": "Green!"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    records = read_coco_captions(tmp_path / "coco.json")
    assert [r["image_id"] for r in records] == [7, 7, 9] and records[0]["texts"] == ["A red circle."]
    ds = build_dataset("coco", tmp_path / "coco.json", tmp_path, IMAGE, train=False)
    assert ds[0]["text"] == "a red circle" and ds[0]["image_id"] == ds[1]["image_id"] == 7
    lavis = [{"image": images[0][0], "caption": "x", "image_id": "coco_1"}]
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    assert build_dataset("coco", tmp_path / "lavis.json", tmp_path, IMAGE)[0]["image_id"] == 0  # str ids -> ints


def test_vqa_jsonl_and_vqav2(tmp_path):
    ds = build_dataset("vqa", write_vqa(tmp_path, 4), tmp_path, IMAGE)
    assert isinstance(ds, VQADataset)
    item = ds[1]
    assert item["question"] == "what color is this ?" and item["answer"] == "green"  # most frequent answer
    assert item["answers"] == ["green", "green", "blue"]
    (tmp_path / "train2014").mkdir()
    write_images(tmp_path / "tmp", 1)
    (tmp_path / "tmp" / "images" / "000.png").rename(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg")
    q = {"data_subtype": "train2014", "questions": [{"image_id": 42, "question": "Is it red?", "question_id": 1}]}
    a = {"annotations": [{"question_id": 1, "image_id": 42, "answers": [{"answer": "yes"}] * 9 + [{"answer": "no"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    assert read_vqav2(tmp_path / "q.json", tmp_path / "a.json")[0]["image"] == "train2014/COCO_train2014_000000000042.jpg"
    v2 = build_dataset("vqav2", tmp_path / "q.json", tmp_path, IMAGE, annotations=tmp_path / "a.json")
    assert v2[0]["answer"] == "yes" and v2[0]["question"] == "is it red?" and v2[0]["image_id"] == 42


def test_vqa_jsonl_history_is_read_and_cleaned(tmp_path):
    write_images(tmp_path, 1)
    rows = [{"image": "images/000.png", "question": "What colour is it?", "answers": "red",
             "history": [["What SHAPE is this?", " circle "]]},
            {"image": "images/000.png", "question": "is it red?", "answers": "yes"}]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_dataset("vqa", tmp_path / "h.jsonl", tmp_path, IMAGE)
    assert ds[0]["history"] == [("what shape is this?", "circle")] and ds[1]["history"] == []
    assert collate([ds[0], ds[1]])["history"] == [[("what shape is this?", "circle")], []]
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "history": ["q", "a"]}) + "\n")
    with pytest.raises(DatasetError, match="'history' must be a list of \\[question, answer\\]"):
        build_dataset("vqa", tmp_path / "bad.jsonl", tmp_path, IMAGE)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "a.png"}\n', "line 1 needs keys 'image' and 'text'"),
        ('{"image": "a.png", "text": []}\n', "non-empty list"),
        ("not json\n", "line 1 is not valid JSON"),
        ("", "has no items"),
    ],
)
def test_bad_annotation_files(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=message):
        build_dataset("pairs", tmp_path / "p.jsonl", tmp_path, IMAGE)


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    path = write_pairs(tmp_path, 6)
    (tmp_path / "images" / "001.png").write_bytes(b"this is not a png")
    (tmp_path / "images" / "004.png").unlink()
    ds = build_dataset("pairs", path, tmp_path, IMAGE)
    with caplog.at_level(logging.WARNING, logger="blip2.data"):
        loader, sampler = make_loader(ds, batch_size=3, world_size=1, rank=0, seed=0, collate_fn=collate)
        sampler.shuffle = False
        batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 2, 2], [3, 5, 5]]  # replaced by the next readable
    assert sum(b["skipped"] for b in batches) == 2
    assert ds.bad_files == {str(tmp_path / "images" / "001.png"), str(tmp_path / "images" / "004.png")}
    assert sum("skipping an unreadable image" in r.message for r in caplog.records) == 2  # once per file
    ds.check_readable()  # fine: some images read


def test_a_dataset_without_readable_images_fails_before_compute(tmp_path):
    path = write_pairs(tmp_path, 3)
    for p in (tmp_path / "images").iterdir():
        p.write_bytes(b"")
    ds = build_dataset("pairs", path, tmp_path, IMAGE)
    with pytest.raises(DatasetError, match="none of its 3 images can be read"):
        ds.check_readable()


def test_sampler_splits_each_global_batch_between_ranks():
    one = GlobalBatchSampler(10, batch_size=4, world_size=1, seed=3)
    two = [GlobalBatchSampler(10, batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert one.batches_per_epoch == two[0].batches_per_epoch == 2  # 10 // 4, the rest dropped
    for epoch_start in (0, 2, 3):  # positions count micro-batches across epochs
        one.set_position(epoch_start)
        for s in two:
            s.set_position(epoch_start)
        ranks = [list(s) for s in two]
        assert list(one) == [a + b for a, b in zip(*ranks)]
    one.set_position(3)
    assert one.epoch == 1 and len(one) == 1
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(3, batch_size=2, world_size=2)


def test_micro_batches_resume_mid_epoch(tmp_path):
    ds = build_dataset("pairs", write_pairs(tmp_path, 6), tmp_path, IMAGE)
    loader, sampler = make_loader(ds, batch_size=2, world_size=1, rank=0, seed=1, collate_fn=collate)
    stream = micro_batches(loader, sampler)
    full = [next(stream)["index"].tolist() for _ in range(7)]  # crosses two epoch boundaries
    loader2, sampler2 = make_loader(ds, batch_size=2, world_size=1, rank=0, seed=1, collate_fn=collate)
    resumed = micro_batches(loader2, sampler2, start=4)
    assert [next(resumed)["index"].tolist() for _ in range(3)] == full[4:]
    assert sorted(sum(full[:3], [])) == list(range(6))  # an epoch visits every item once
