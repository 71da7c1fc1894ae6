"""Training datasets: image-text pairs and VQA, from JSONL, COCO caption or VQAv2 files.

Annotation formats (image paths are relative to an image root folder):
- pairs JSONL:    {"image": "a/b.jpg", "text": "a caption" | ["caption 1", "caption 2", ...]}   one per line
- COCO captions:  {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}  (one record per
                  caption, as LAVIS' caption datasets), or LAVIS' list [{"image", "caption", "image_id"}]
- VQA JSONL:      {"image": "a/b.jpg", "question": "what color is it?", "answers": ["red", "red", ...]}
                  optional "history": [["what shape is this?", "circle"], ...]: earlier turns of a chat about
                  the image, which the stage-2 prompt puts before the question (as `Blip2.chat` does)
- VQAv2:          the official questions JSON + annotations JSON; images at
                  {data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg (e.g. train2014/COCO_train2014_...)

Text processing follows LAVIS' BLIP processors (REFERENCE §5, §6): captions are lowercased, the symbols
.!"()*#:;~ become spaces, whitespace is collapsed and at most 50 words are kept (`pre_caption`); questions
are lowercased with those symbols deleted (`pre_question`); answers are only stripped. When a record holds
several captions, one is drawn per visit (CapFilt keeps two and samples one per step, REFERENCE §5); a VQA
record trains on its most frequent answer.

Unreadable images never stop training: an item whose image cannot be read is replaced by the next readable
item of the dataset and the skip is counted (`skipped` in the item and the batch, summed by the recipe),
and each bad file is logged once per process. Batches therefore keep their size, which DDP's gathers need.
A dataset without a single readable image is an error found before any compute (`check_readable`).

Randomness (crop, flip, caption choice) comes from a generator seeded by (seed, epoch, index), so an item
is the same whatever the worker, the rank or a resume: samplers pass keys `(epoch, index)`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blip2.data.feature_cache import FeatureCache
from blip2.data.images import ImageError, ImageSettings, eval_resize, load_image, normalize, train_transform

log = logging.getLogger("blip2.data")

MAX_WORDS = 50  # LAVIS BlipCaptionProcessor / BlipQuestionProcessor


class DatasetError(ValueError):
    """An annotation file or image folder cannot be used: the message names the file (and line)."""


# --------------------------------------------------------------------------------------- text processing


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS `BlipCaptionProcessor.pre_caption`: lowercase, .!"()*#:;~ -> space, collapse spaces, 50 words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS `BlipQuestionProcessor.pre_question`: lowercase, delete .!"()*#:;~, at most 50 words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def most_common_answer(answers: Sequence[str]) -> str:
    """The most frequent answer; ties go to the one seen first."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


# ------------------------------------------------------------------------------------ annotation readers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path} line {number} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path} line {number} must be a JSON object")
            rows.append((number, row))
    return rows


def _texts(value: Any, where: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise DatasetError(f"{where}: 'text' must be a string or a non-empty list of strings, got {value!r}")
    return texts


def read_pairs_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """{"image", "text": str | [str], optional "image_id"} per line -> records {"image", "texts"[, "image_id"]}."""
    path = Path(path)
    records = []
    for number, row in _read_jsonl(path):
        where = f"{path} line {number}"
        if "image" not in row or "text" not in row:
            hint = " (a VQA file? use the vqa format)" if "question" in row else ""
            raise DatasetError(f"{where} needs keys 'image' and 'text', has {sorted(row)}{hint}")
        rec: dict[str, Any] = {"image": str(row["image"]), "texts": _texts(row["text"], where)}
        if "image_id" in row:  # items sharing an id are all ITC positives of each other (REFERENCE §2)
            rec["image_id"] = row["image_id"]
        records.append(rec)
    return records


def read_coco_captions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """COCO caption annotations (or LAVIS' caption list) -> one record {"image", "texts", "image_id"} per caption."""
    path = Path(path)
    data = _read_json(path)
    records = []
    if isinstance(data, dict) and "annotations" in data:
        files = {img["id"]: img["file_name"] for img in data.get("images", [])}
        for i, ann in enumerate(data["annotations"]):
            if ann.get("image_id") not in files:
                raise DatasetError(f"{path}: annotation {i} names image_id {ann.get('image_id')!r}, not in 'images'")
            texts = _texts(ann.get("caption"), f"{path} annotation {i}")
            records.append({"image": files[ann["image_id"]], "texts": texts, "image_id": ann["image_id"]})
        return records
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise DatasetError(f"{path}: item {i} needs keys 'image' and 'caption'")
            rec = {"image": str(row["image"]), "texts": _texts(row["caption"], f"{path} item {i}")}
            if "image_id" in row:
                rec["image_id"] = row["image_id"]
            records.append(rec)
        return records
    raise DatasetError(f"{path} is neither COCO caption annotations ('images' + 'annotations') nor a list of captions")


def read_vqa_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """{"image", "question", "answers": [str] | str[, "history": [[q, a], ...]]} per line -> records
    {"image", "question", "answers"[, "history"]}."""
    path = Path(path)
    records = []
    for number, row in _read_jsonl(path):
        where = f"{path} line {number}"
        if not {"image", "question", "answers"} <= set(row):
            raise DatasetError(f"{where} needs keys 'image', 'question' and 'answers', has {sorted(row)}")
        answers = [row["answers"]] if isinstance(row["answers"], str) else row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DatasetError(f"{where}: 'answers' must be a string or a non-empty list of strings")
        record = {"image": str(row["image"]), "question": str(row["question"]), "answers": answers}
        if "history" in row:
            history = row["history"]
            if not isinstance(history, list) or not all(
                isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
            ):
                raise DatasetError(f"{where}: 'history' must be a list of [question, answer] string pairs")
            record["history"] = [(q, a) for q, a in history]
        records.append(record)
    return records


def read_vqav2(questions: str | os.PathLike, annotations: str | os.PathLike) -> list[dict[str, Any]]:
    """The official VQAv2 questions + annotations JSON -> records {"image", "question", "answers", "image_id",
    "question_id", "question_type", "answer_type"} (the last three for evaluation)."""
    qpath, apath = Path(questions), Path(annotations)
    qdata, adata = _read_json(qpath), _read_json(apath)
    if "questions" not in qdata:
        raise DatasetError(f"{qpath} has no 'questions': not a VQAv2 questions file")
    if "annotations" not in adata:
        raise DatasetError(f"{apath} has no 'annotations': not a VQAv2 annotations file")
    subtype = qdata.get("data_subtype", "")
    if not subtype:
        raise DatasetError(f"{qpath} has no 'data_subtype' (e.g. train2014): cannot name the image files")
    by_qid = {a["question_id"]: a for a in adata["annotations"]}
    records = []
    for q in qdata["questions"]:
        ann = by_qid.get(q["question_id"])
        if ann is None:
            raise DatasetError(f"{apath} has no annotation for question_id {q['question_id']}")
        image = f"{subtype}/COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        answers = [a["answer"] for a in ann.get("answers", [])] or [ann.get("multiple_choice_answer", "")]
        records.append({"image": image, "question": q["question"], "answers": answers, "image_id": q["image_id"],
                        "question_id": q["question_id"], "question_type": ann.get("question_type"),
                        "answer_type": ann.get("answer_type")})
    return records


# -------------------------------------------------------------------------------------------- datasets


class _ImageRecords(torch.utils.data.Dataset):
    """Records with an "image" path; yields dicts with the processed pixels. Subclasses add the text."""

    def __init__(self, records: list[dict[str, Any]], image_root: str | os.PathLike, image: ImageSettings,
                 train: bool = True, seed: int = 0, name: str = "dataset", features: FeatureCache | None = None):
        if not records:
            raise DatasetError(f"{name} has no items")
        if features is not None and train:
            raise DatasetError("a feature cache holds un-augmented features: set data.augment=false to use it")
        # Cached frozen features (N, D) replace the pixels; items carry them under "pixels" all the same.
        self.features = features
        self.records, self.root, self.image = records, Path(image_root), image
        self.train, self.seed, self.name = train, seed, name
        self.bad_files: set[str] = set()  # in this process; DataLoader workers count through `skipped`
        # Image ids for ITC (REFERENCE §2): the record's own, else one id per distinct image path.
        ids: dict[str, int] = {}
        for rec in records:
            if "image_id" not in rec:
                rec["image_id"] = ids.setdefault(rec["image"], len(ids))
            elif not isinstance(rec["image_id"], int):
                rec["image_id"] = ids.setdefault(f"id:{rec['image_id']}", len(ids))

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, epoch: int, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds are hashed with SHA-512: stable

    def _pixels(self, rec: dict[str, Any], rng: random.Random) -> torch.Tensor:
        if self.features is not None:
            if rec["image"] not in self.features:
                raise DatasetError(f"{rec['image']} is not in the feature cache {self.features.folder}")
            return self.features[rec["image"]]  # (N, D) float16
        rgb = load_image(self.root / rec["image"])
        out = train_transform(rgb, self.image, rng) if self.train else eval_resize(rgb, self.image)
        return normalize([out], self.image)[0]  # (3, S, S)

    def _bad(self, path: Path, err: Exception) -> None:
        if str(path) not in self.bad_files:
            self.bad_files.add(str(path))
            log.warning("skipping an unreadable image in %s: %s", self.name, err)

    def _load(self, key: int | tuple[int, int]) -> tuple[int, dict[str, Any], torch.Tensor, random.Random, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.records)
        for attempt in range(n):
            j = (index + attempt) % n
            rng = self._rng(epoch, j)
            rec = self.records[j]
            try:
                return j, rec, self._pixels(rec, rng), rng, attempt
            except ImageError as err:
                self._bad(self.root / rec["image"], err)
        raise DatasetError(f"{self.name}: none of its {n} images can be read (looked under {self.root})")

    def check_readable(self) -> None:
        """Raise DatasetError unless at least one image reads (normally costs one image)."""
        check_images(self.records, self.root, self.name)

    def _item(self, key: int | tuple[int, int]) -> tuple[dict[str, Any], dict[str, Any], random.Random]:
        j, rec, pixels, rng, skipped = self._load(key)
        return rec, {"pixels": pixels, "image_id": rec["image_id"], "index": j, "skipped": skipped}, rng


class ImageTextDataset(_ImageRecords):
    """Image-caption pairs -> {"pixels" (3, S, S), "text", "image_id", "index", "skipped"}."""

    def __init__(self, records, image_root, image, train=True, seed=0, name="dataset", clean_text: bool = True,
                 features: FeatureCache | None = None):
        super().__init__(records, image_root, image, train, seed, name, features)
        for i, rec in enumerate(records):
            if "texts" not in rec:
                raise DatasetError(f"{name}: record {i} has no caption ('texts'); is this a VQA file?")
        self.clean_text = clean_text

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        rec, item, rng = self._item(key)
        texts = rec["texts"]
        text = texts[rng.randrange(len(texts))] if len(texts) > 1 else texts[0]
        item["text"] = pre_caption(text) if self.clean_text else text
        return item


class VQADataset(_ImageRecords):
    """Questions with answers -> {"pixels", "question", "answer", "answers", "image_id", "index", "skipped"}."""

    def __init__(self, records, image_root, image, train=True, seed=0, name="dataset", clean_text: bool = True,
                 features: FeatureCache | None = None):
        super().__init__(records, image_root, image, train, seed, name, features)
        for i, rec in enumerate(records):
            if "question" not in rec or "answers" not in rec:
                raise DatasetError(f"{name}: record {i} has no question/answers; is this a caption file?")
        self.clean_text = clean_text

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        rec, item, _ = self._item(key)
        answers = [a.strip() for a in rec["answers"]]
        item["question"] = pre_question(rec["question"]) if self.clean_text else rec["question"]
        item["answer"] = most_common_answer(answers)
        item["answers"] = answers
        clean = pre_question if self.clean_text else str
        item["history"] = [(clean(q), a.strip()) for q, a in rec.get("history", ())]
        return item


FORMATS = ("pairs", "coco", "vqa", "vqav2")


def read_records(
    fmt: str, path: str | os.PathLike, annotations: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """The records of an annotation file in one of FORMATS (`annotations`: the VQAv2 annotations file)."""
    if fmt == "pairs":
        return read_pairs_jsonl(path)
    if fmt == "coco":
        return read_coco_captions(path)
    if fmt == "vqa":
        return read_vqa_jsonl(path)
    if fmt == "vqav2":
        if annotations is None:
            raise DatasetError("the vqav2 format needs the annotations file as well as the questions file")
        return read_vqav2(path, annotations)
    if fmt == "webdataset":
        raise DatasetError("the webdataset format streams tar shards (blip2.data.webdataset.webdataset_loader), it "
                           "has no annotation records: this recipe does not read it")
    raise DatasetError(f"unknown dataset format {fmt!r} (known: {', '.join(FORMATS)})")


def check_images(records: list[dict[str, Any]], image_root: str | os.PathLike, name: str = "dataset") -> int:
    """The index of the first record whose image reads; DatasetError when none does. Normally costs one
    image, so recipes call it before building the model: a wrong image folder fails at once."""
    root = Path(image_root)
    if not records:
        raise DatasetError(f"{name} has no items")
    first_error = None
    for i, rec in enumerate(records):
        try:
            load_image(root / rec["image"])
            return i
        except ImageError as err:
            first_error = first_error or err
    raise DatasetError(f"{name}: none of its {len(records)} images can be read (looked under {root}; "
                       f"first error: {first_error})")


def build_dataset(
    fmt: str, path: str | os.PathLike, image_root: str | os.PathLike, image: ImageSettings, *,
    annotations: str | os.PathLike | None = None, train: bool = True, seed: int = 0, clean_text: bool = True,
    records: list[dict[str, Any]] | None = None, features: FeatureCache | None = None,
) -> ImageTextDataset | VQADataset:
    """One of FORMATS -> its dataset (`records`: already read with `read_records`)."""
    name = f"{fmt} dataset {path}"
    records = records if records is not None else read_records(fmt, path, annotations)
    cls = VQADataset if fmt in ("vqa", "vqav2") else ImageTextDataset
    return cls(records, image_root, image, train, seed, name, clean_text, features)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> a batch: tensors stacked, numbers as a tensor, strings and lists kept as lists; `skipped`
    is the batch's total of replaced unreadable images."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "skipped":
            batch[key] = int(sum(values))
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch
