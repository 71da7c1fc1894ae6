"""Evaluation data: what `--data` names, read into questions, captioned images or a retrieval set.

`--data` is one or two paths, or a packaged name:
- VQA:        a VQA JSONL ({"image", "question", "answers"}, optional "question_id", "question_type",
              "answer_type"); VQAv2 as the questions JSON and the annotations JSON (two paths, either
              order) or a folder holding one `*questions*.json` and one `*annotations*.json`;
              `easy-vqa:test` / `easy-vqa:train` (one answer per question); `shapes-vqa:test` (600 questions
              about 200 images our own renderer draws, blip2.eval.shapes_vqa).
- captions:   COCO caption annotations ({"images", "annotations"}) or LAVIS' list ({"image", "caption"}), or
              a caption JSONL ({"image", "text": [references]}); `easy-vqa-captions:test|train`
              (one reference per image, "a {colour} {shape}", see blip2.eval.easy_vqa).
- retrieval:  any caption file (each image with its captions); `easy-vqa-retrieval:test|train` (the split's
              images against the 24 colour-shape texts: every text matches many images).
- chat:       a conversation JSONL ({"image", "turns": [[question, answer | [answers]], ...]}), or
              `easy-vqa-chat:test|train` ("what shape is this?" then "what color is it?" about each image).
Image paths in a file are relative to `image_root`, by default the folder of the (first) data file; every
image is checked to exist before a model loads. The annotation files are parsed by blip2.data.datasets'
readers where they keep what evaluation needs (VQAv2 is read here: the evaluation needs the question ids
and the question/answer types that the training reader drops).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip2.eval import easy_vqa, shapes_vqa

# Packaged names -> the task they serve.
PACKAGED = {"easy-vqa": "vqa", "easy-vqa-captions": "caption", "easy-vqa-retrieval": "retrieval",
            "easy-vqa-chat": "chat", "shapes-vqa": "vqa"}
SPLITS = {"shapes-vqa": shapes_vqa.SPLITS}  # the others: easy_vqa.SPLITS
# The conversation `easy-vqa-chat` holds about each image: the second turn only makes sense after the first.
EASY_VQA_CHAT = (("what shape is this?", "shape"), ("what color is it?", "colour"))
_NAME = re.compile(r"([a-z0-9-]+):([a-z0-9-]+)")


@dataclass(frozen=True)
class VQAItem:
    question_id: Any
    image: str  # a path
    question: str
    answers: list[str]
    question_type: str | None = None
    answer_type: str | None = None


@dataclass(frozen=True)
class CaptionItem:
    image_id: Any
    image: str
    references: list[str]
    labels: tuple[str, str] | None = None  # easy-VQA (colour, shape)


@dataclass(frozen=True)
class ChatItem:
    conversation_id: Any
    image: str
    turns: list[tuple[str, list[str]]]  # (question, reference answers), asked in order in one session


@dataclass
class RetrievalSet:
    """Images and texts; img2txt[i] lists image i's texts, txt2img[t] the images text t describes."""

    images: list[str]
    image_ids: list[Any]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[list[int]]
    multi_image_texts: bool = False  # True when a text can describe several images (easy-VQA)
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ naming


def packaged_name(spec: Sequence[str]) -> tuple[str, str] | None:
    """("easy-vqa", "test") for ["easy-vqa:test"]; None when `spec` names files."""
    if len(spec) != 1 or Path(spec[0]).exists():
        return None
    match = _NAME.fullmatch(spec[0])
    if match is None:
        return None
    name, split = match.groups()
    if name not in PACKAGED:
        known = ", ".join(f"{n}:test" for n in PACKAGED)
        raise ValueError(f"unknown dataset name {spec[0]!r}: use a data file or one of {known} (easy-vqa names "
                         "also :train).")
    splits = SPLITS.get(name, easy_vqa.SPLITS)
    if split not in splits:
        choices = " or ".join(f"{name}:{s}" for s in splits)
        raise ValueError(f"dataset {name} has no split {split!r}; use {choices}.")
    return name, split


def _check_task(name: str, task: str) -> None:
    if PACKAGED[name] != task:
        kind = PACKAGED[name]
        raise ValueError(f"{name} is a {kind} dataset, not a {task} one: run `blip2 eval {kind}` with it.")


def _existing_paths(spec: Sequence[str]) -> list[Path]:
    if not spec:
        raise ValueError("no data given: pass --data with a data file, a folder or a dataset name.")
    paths = [Path(p) for p in spec]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"data file {p} does not exist.")
    return paths


def _root(image_root: str | os.PathLike | None, first: Path) -> Path:
    root = Path(image_root) if image_root is not None else (first if first.is_dir() else first.parent)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a folder.")
    return root


def _resolve_images(relative: Sequence[str], root: Path, source: Path) -> list[str]:
    """Absolute image paths; a clear error naming the first missing one (and how many are missing)."""
    cache: dict[str, str] = {}
    missing: list[str] = []
    for rel in relative:
        if rel not in cache:
            path = Path(rel) if Path(rel).is_absolute() else root / rel
            cache[rel] = str(path)
            if not path.is_file():
                missing.append(str(path))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"image {missing[0]}{more} named in {source} does not exist; image paths are relative to {root}, "
            f"pass --image-root with the folder that holds them."
        )
    return [cache[r] for r in relative]


def _limit(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be 1 or more, got {limit}.")
    return items if limit is None else items[:limit]


# ----------------------------------------------------------------------------------------------------- VQA


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None


def _vqav2_files(paths: list[Path]) -> tuple[Path, Path]:
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        qs, anns = sorted(folder.glob("*questions*.json")), sorted(folder.glob("*annotations*.json"))
        if len(qs) != 1 or len(anns) != 1:
            raise ValueError(
                f"folder {folder} must hold exactly one *questions*.json and one *annotations*.json "
                f"(found {len(qs)} and {len(anns)}); pass the two files instead."
            )
        return qs[0], anns[0]
    if len(paths) == 2:
        return paths[0], paths[1]
    raise ValueError(f"VQAv2 needs its questions JSON and its annotations JSON; got only {paths[0]}.")


def read_vqav2_eval(questions: Path, annotations: Path, root: Path) -> list[VQAItem]:
    """The official questions + annotations -> items with question ids and the official types."""
    from blip2.data.datasets import read_vqav2  # its DatasetError is a ValueError: the CLI prints one line

    qdata = _read_json(questions)
    if isinstance(qdata, dict) and "annotations" in qdata:  # given the other way round
        questions, annotations = annotations, questions
    records = read_vqav2(questions, annotations)
    return [VQAItem(r["question_id"], r["image"], r["question"], r["answers"], r["question_type"], r["answer_type"])
            for r in records]


def _read_vqa_jsonl(path: Path) -> list[VQAItem]:
    from blip2.data.datasets import read_vqa_jsonl

    records = read_vqa_jsonl(path)  # validates every line
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]  # same lines, in order
    return [
        VQAItem(row.get("question_id", i), rec["image"], rec["question"], rec["answers"],
                row.get("question_type"), row.get("answer_type"))
        for i, (rec, row) in enumerate(zip(records, raw))
    ]


def load_vqa(spec: Sequence[str], image_root: str | os.PathLike | None = None,
             limit: int | None = None) -> list[VQAItem]:
    """VQA items from `--data` (module docstring), the first `limit` of them."""
    named = packaged_name(spec)
    if named is not None:
        _check_task(named[0], "vqa")
        if named[0] == "shapes-vqa":
            return load_vqa([str(shapes_vqa.build(named[1]) / shapes_vqa.QUESTIONS)], limit=limit)
        qs = _limit(list(easy_vqa.questions(named[1])), limit)
        return [
            VQAItem(q.question_id, q.image, q.question, [q.answer],
                    easy_vqa.question_type(q.answer), easy_vqa.answer_type(q.answer))
            for q in qs
        ]
    paths = _existing_paths(spec)
    root = _root(image_root, paths[0])
    if len(paths) == 1 and paths[0].is_file() and paths[0].suffix.lower() in (".jsonl", ".ndjson"):
        items = _read_vqa_jsonl(paths[0])
    else:
        qpath, apath = _vqav2_files(paths)
        items = read_vqav2_eval(qpath, apath, root)
    if not items:
        raise ValueError(f"{paths[0]} holds no questions.")
    ids = [it.question_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{paths[0]} repeats a question_id: every question needs its own.")
    items = _limit(items, limit)
    images = _resolve_images([it.image for it in items], root, paths[0])
    return [VQAItem(it.question_id, img, it.question, it.answers, it.question_type, it.answer_type)
            for it, img in zip(items, images)]


# ------------------------------------------------------------------------------------------------ captions


def _read_caption_file(path: Path) -> list[tuple[Any, str, list[str]]]:
    """(image_id, relative image path, references) per image, in first-seen order."""
    from blip2.data.datasets import read_coco_captions, read_pairs_jsonl

    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the caption file (COCO JSON or JSONL).")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    records = read_pairs_jsonl(path) if jsonl else read_coco_captions(path)
    grouped: dict[Any, tuple[Any, str, list[str]]] = {}
    for rec in records:
        key = rec.get("image_id", rec["image"])
        if key not in grouped:
            grouped[key] = (key, rec["image"], [])
        grouped[key][2].extend(rec["texts"])
    if not grouped:
        raise ValueError(f"{path} holds no captions.")
    return list(grouped.values())


def load_captions(spec: Sequence[str], image_root: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[CaptionItem]:
    """One item per image with its reference captions, the first `limit` images."""
    named = packaged_name(spec)
    if named is not None:
        _check_task(named[0], "caption")
        return _limit(_easy_vqa_caption_items(named[1]), limit)
    paths = _existing_paths(spec)
    if len(paths) != 1:
        raise ValueError("caption evaluation reads one caption file; got several --data paths.")
    rows = _limit(_read_caption_file(paths[0]), limit)
    images = _resolve_images([r[1] for r in rows], _root(image_root, paths[0]), paths[0])
    return [CaptionItem(image_id, img, refs) for (image_id, _, refs), img in zip(rows, images)]


def _easy_vqa_caption_items(split: str) -> list[CaptionItem]:
    labels = easy_vqa.image_labels(split)
    paths = {q.image_id: q.image for q in easy_vqa.questions(split)}
    return [
        CaptionItem(image_id, paths[image_id], [easy_vqa.caption_text(*labels[image_id])], labels[image_id])
        for image_id in sorted(labels)
    ]


# ----------------------------------------------------------------------------------------------- retrieval


def load_retrieval(spec: Sequence[str], image_root: str | os.PathLike | None = None,
                   limit: int | None = None) -> RetrievalSet:
    """Images and texts with both ground-truth maps; `limit` keeps the first images (and their texts)."""
    named = packaged_name(spec)
    if named is not None:
        _check_task(named[0], "retrieval")
        return _easy_vqa_retrieval(named[1], limit)
    paths = _existing_paths(spec)
    if len(paths) != 1:
        raise ValueError("retrieval evaluation reads one caption file; got several --data paths.")
    rows = _limit(_read_caption_file(paths[0]), limit)
    images = _resolve_images([r[1] for r in rows], _root(image_root, paths[0]), paths[0])
    texts: list[str] = []
    img2txt: list[list[int]] = []
    txt2img: list[list[int]] = []
    for i, (_, _, refs) in enumerate(rows):
        img2txt.append(list(range(len(texts), len(texts) + len(refs))))
        texts += refs
        txt2img += [[i] for _ in refs]
    return RetrievalSet(images, [r[0] for r in rows], texts, img2txt, txt2img)


def _easy_vqa_retrieval(split: str, limit: int | None) -> RetrievalSet:
    items = _limit(_easy_vqa_caption_items(split), limit)
    texts = easy_vqa.all_caption_texts()
    index = {t: k for k, t in enumerate(texts)}
    img2txt = [[index[it.references[0]]] for it in items]
    txt2img: list[list[int]] = [[] for _ in texts]
    for i, (t,) in enumerate(img2txt):
        txt2img[t].append(i)
    return RetrievalSet([it.image for it in items], [it.image_id for it in items], texts, img2txt, txt2img,
                        multi_image_texts=True)


# ---------------------------------------------------------------------------------------------------- chat


def _read_chat_jsonl(path: Path) -> list[tuple[Any, str, list[tuple[str, list[str]]]]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{where} is not valid JSON.") from None
        if not isinstance(row, dict) or not {"image", "turns"} <= set(row):
            raise ValueError(f"{where} needs keys 'image' and 'turns'.")
        turns = []
        for turn in row["turns"] if isinstance(row["turns"], list) else [None]:
            if not (isinstance(turn, list) and len(turn) == 2 and isinstance(turn[0], str)):
                raise ValueError(f"{where}: 'turns' must be a non-empty list of [question, answer] pairs.")
            answers = [turn[1]] if isinstance(turn[1], str) else turn[1]
            if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
                raise ValueError(f"{where}: a turn's answer must be a string or a non-empty list of strings.")
            turns.append((turn[0], answers))
        if not turns:
            raise ValueError(f"{where}: 'turns' must be a non-empty list of [question, answer] pairs.")
        rows.append((row.get("conversation_id", len(rows)), str(row["image"]), turns))
    return rows


def load_chat(spec: Sequence[str], image_root: str | os.PathLike | None = None,
              limit: int | None = None) -> list[ChatItem]:
    """Conversations from `--data` (module docstring), the first `limit` of them."""
    named = packaged_name(spec)
    if named is not None:
        _check_task(named[0], "chat")
        labels = easy_vqa.image_labels(named[1])
        paths = {q.image_id: q.image for q in easy_vqa.questions(named[1])}
        items = []
        for image_id in sorted(labels):
            answer = dict(zip(("colour", "shape"), labels[image_id]))
            items.append(ChatItem(image_id, paths[image_id], [(q, [answer[kind]]) for q, kind in EASY_VQA_CHAT]))
        return _limit(items, limit)
    paths = _existing_paths(spec)
    if len(paths) != 1 or paths[0].is_dir():
        raise ValueError("chat evaluation reads one conversation JSONL file.")
    rows = _read_chat_jsonl(paths[0])
    if not rows:
        raise ValueError(f"{paths[0]} holds no conversations.")
    rows = _limit(rows, limit)
    images = _resolve_images([r[1] for r in rows], _root(image_root, paths[0]), paths[0])
    return [ChatItem(cid, img, turns) for (cid, _, turns), img in zip(rows, images)]


LOADERS = {"vqa": load_vqa, "caption": load_captions, "retrieval": load_retrieval, "chat": load_chat}


def load(task: str, spec: Sequence[str], image_root: str | os.PathLike | None = None, limit: int | None = None):
    """The data of an evaluation task (`blip2 eval TASK --data ...`, validation during training)."""
    if task not in LOADERS:
        raise ValueError(f"unknown evaluation task {task!r} (known: {', '.join(LOADERS)})")
    return LOADERS[task](spec, image_root, limit)
