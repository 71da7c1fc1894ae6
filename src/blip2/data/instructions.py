"""Instruction templates for stage-2 instruction tuning (InstructBLIP, Dai et al. 2023, §2.3 and Table 7):
each training record is phrased by a template drawn per sample, so the model follows many wordings of a task
instead of one fixed prompt.

Three tasks, told apart by the record alone (the data formats stage 2 already reads, data/datasets.py):
- caption: a caption record (pairs / COCO files, or a VQA-format record with an empty question);
- vqa:     a question with answers;
- chat:    a question with `history`, earlier turns of a conversation about the image: every turn is
           phrased with the one template drawn for the sample (a short one: the turns add up), as
           `Blip2.chat` phrases a conversation.
The target is the caption or the most frequent answer, as without instructions.

Each list holds the phrasing our inference uses by default (caption: the soft prompt alone; VQA and chat:
BLIP-2's "Question: {} Answer:", REFERENCE §3), so `caption`, `ask` and `chat` stay in the trained
distribution, plus wordings adapted from InstructBLIP's templates.

Several annotation files train together (`mix` in the stage-2 recipe): `as_vqa_records` turns caption records
(pairs, COCO) into VQA-format ones with an empty question, one per caption, so one dataset holds every task.

The draw is a pure function of (the run's seed, the micro-batch counter, the record's index): the same on
every rank and worker, and a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip2.data.datasets import pre_caption
from blip2.data.text import chat_prompt

TASKS = ("caption", "vqa", "chat")

CAPTION_TEMPLATES = (
    "",  # stage 2's own form: the soft prompt alone (what `caption()` sends without a prompt)
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "Describe the image briefly.",
    "Write a short description for the image.",
    "Briefly describe the content of the image.",
    "What does the image show? Answer in a few words.",
)

VQA_TEMPLATES = (  # {} = the question
    "Question: {} Answer:",  # BLIP-2's template (REFERENCE §3): what `ask` and `chat` send by default
    "Question: {} Short answer:",
    "Q: {} A:",
    "{} A short answer to the question is",
    "Given the image, answer the following question with no more than three words. {}",
    "Based on the image, respond to this question with a short answer: {} Answer:",
    "Use the provided image to answer the question: {} Provide your answer as short as possible:",
)

CHAT_TEMPLATES = VQA_TEMPLATES[:3]  # the short ones: every earlier turn repeats the template


def task_of(question: str | None, history: Sequence[Any] | None = None) -> str:
    """The task a record trains: no (or an empty) question = caption; earlier turns = chat; else vqa."""
    if not question:
        return "caption"
    return "chat" if history else "vqa"


def draw_rng(seed: int, micro: int, index: int) -> random.Random:
    """The generator of one sample's draw (str seeds are hashed with SHA-512: stable across processes)."""
    return random.Random(f"{seed}:instruction:{micro}:{index}")


def phrase(task: str, rng: random.Random, question: str = "", history: Sequence[tuple[str, str]] = ()) -> str:
    """The LLM prompt of one sample: a template of `task` drawn with `rng`, filled with the question (and, for
    chat, the earlier turns in the same wording)."""
    if task == "caption":
        return rng.choice(CAPTION_TEMPLATES)
    if task not in TASKS:
        raise ValueError(f"unknown instruction task {task!r} (known: {', '.join(TASKS)})")
    if task == "chat":
        return chat_prompt(history, question, rng.choice(CHAT_TEMPLATES))
    return rng.choice(VQA_TEMPLATES).format(question)


def instruction_batch(batch: dict[str, Any], seed: int, micro: int) -> tuple[list[str], list[str], list[str]]:
    """A collated stage-2 batch (captions: `text`; VQA: `question`, `answer`, `history`) -> (prompts, targets,
    tasks), one template drawn per sample."""
    indices = [int(i) for i in batch["index"]]
    n = len(indices)
    if "question" in batch:
        questions = list(batch["question"])
        histories = batch.get("history") or [()] * n
        targets = list(batch["answer"])
    else:
        questions, histories, targets = [""] * n, [()] * n, list(batch["text"])
    prompts, tasks = [], []
    for index, question, history in zip(indices, questions, histories):
        task = task_of(question, history)
        prompts.append(phrase(task, draw_rng(seed, micro, index), question, history))
        tasks.append(task)
    return prompts, targets, tasks


def as_vqa_records(records: list[dict[str, Any]], image_root: str | Path | None = None,
                   clean_text: bool = True) -> list[dict[str, Any]]:
    """Records of any stage-2 format -> VQA-format records {"image", "question", "answers"[, "history"]}: a
    caption record becomes one record per caption with an empty question (the caption task; the caption is
    cleaned as the caption datasets clean it, since answers are only stripped). `image_root`: the folder the
    records' image paths are relative to, made part of them (None: they stay as they are)."""
    out = []
    for rec in records:
        image = rec["image"] if image_root is None else str(Path(image_root).absolute() / rec["image"])
        if "texts" in rec:
            out += [{"image": image, "question": "", "answers": [pre_caption(t) if clean_text else t]}
                    for t in rec["texts"]]
        else:
            out.append({"image": image, **{k: rec[k] for k in ("question", "answers", "history") if k in rec}})
    return out
