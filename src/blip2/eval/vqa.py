"""VQA evaluation: answer every question, score with the official VQA accuracy (REFERENCE §6-7).

Questions go through the model in batches of `model.batch_size`, in the data's order; the images of a batch
are encoded once each, however many of its questions ask about them (VQA files list questions image by
image). Questions are cleaned as LAVIS' `blip_question` does (lowercase, `.!"()*#:;~` deleted) and put in
the LLM family's template; generation defaults are `Blip2.ask`'s (5 beams, 10 new tokens, length penalty -1).
Accuracy is `blip2.eval.metrics.vqa_accuracy`: overall, per answer type and per question type. easy-VQA's
types: answer type yes/no or other; question type yes/no, colour or shape, from the reference answer.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip2.data.datasets import most_common_answer, pre_question
from blip2.eval.datasets import VQAItem
from blip2.eval.metrics import vqa_accuracy
from blip2.eval.report import (
    METRICS, PREDICTIONS, REPORT, SAMPLES, EvalResult, Report, Sample, chunks, md_table, progress_bar,
    sample_grid, write_json, write_jsonl, write_report,
)  # fmt: skip

N_EXAMPLES = 10
N_TILES = 16


def predict_answers(model, items: Sequence[VQAItem], generation: dict[str, Any] | None = None,
                    template: str | None = None, clean_questions: bool = True,
                    progress: bool | None = None) -> tuple[list[str], str, dict[str, Any]]:
    """(answers, the template used, the generation settings used) for `items`, batch by batch."""
    import torch

    from blip2.inference.pipeline import VQA_DEFAULTS

    model._need_llm()
    template = template or model.question_template
    gen = model._generation(VQA_DEFAULTS, generation or {})
    answers: list[str] = []
    with progress_bar(len(items), "vqa", "question", progress) as bar:
        for chunk in chunks(items, model.batch_size):
            images = list(dict.fromkeys(it.image for it in chunk))  # each image once, in order
            feats = model.encode_images(images)  # (U, N, Dv): each image once
            index = torch.tensor([images.index(it.image) for it in chunk], device=feats.device)
            questions = [pre_question(it.question) if clean_questions else it.question for it in chunk]
            soft = model.soft_prompts(feats[index], questions)  # (B, Q, H)
            prompts = [template.format(q) for q in questions]
            answers += model._generate(soft, prompts, gen)
            bar.update(len(chunk))
    return answers, template, {k: v for k, v in gen.items() if k != "pad_token_id"}


def score(items: Sequence[VQAItem], answers: Sequence[str]):
    """The official accuracy of `answers` (one per item): a `VQAResult`."""
    annotations = [
        {"question_id": it.question_id, "answers": it.answers, "question_type": it.question_type,
         "answer_type": it.answer_type}
        for it in items
    ]
    return vqa_accuracy({it.question_id: a for it, a in zip(items, answers)}, annotations)


def _tile_text(row: dict[str, Any]) -> str:
    return f"Q: {row['question']}\npred: {row['prediction']}\nref: {most_common_answer(row['answers'])}"


def _type_rows(kind: str, accuracy: dict[str, float], counts: Counter) -> list[list[Any]]:
    return [[f"{kind}: {name}", acc, counts[name]] for name, acc in sorted(accuracy.items())]


def evaluate_vqa(model, items: Sequence[VQAItem], out_dir: Path, *, model_name: str = "", data_name: str = "",
                 generation: dict[str, Any] | None = None, template: str | None = None,
                 clean_questions: bool = True, progress: bool | None = None) -> EvalResult:
    """Answer, score, and write predictions / metrics / report / sample grid into `out_dir`."""
    if not items:
        raise ValueError("no questions to evaluate.")
    start = time.perf_counter()
    answers, template, gen = predict_answers(model, items, generation, template, clean_questions, progress)
    result = score(items, answers)
    seconds = time.perf_counter() - start

    rows = [
        {"question_id": it.question_id, "image": it.image, "question": it.question, "prediction": a,
         "answers": it.answers, "accuracy": result.per_question[it.question_id],
         "question_type": it.question_type, "answer_type": it.answer_type}
        for it, a in zip(items, answers)
    ]
    metrics = {
        "task": "vqa", "model": model_name, "data": data_name, "n_questions": len(items),
        "n_images": len({it.image for it in items}), "accuracy": result.overall,
        "per_answer_type": result.per_answer_type, "per_question_type": result.per_question_type,
        "template": template, "clean_questions": clean_questions, "generation": gen,
        "seconds": round(seconds, 2),
    }
    write_jsonl(out_dir / PREDICTIONS, rows)
    write_json(out_dir / METRICS, metrics)

    worst_first = sorted(rows, key=lambda r: r["accuracy"])  # stable: data order within a score
    tiles = [Sample(r["image"], _tile_text(r), r["accuracy"] >= 100) for r in worst_first[:N_TILES]]
    sample_grid(out_dir / SAMPLES, tiles, title=f"VQA: {data_name} (wrong first)")

    table = [["overall", result.overall, len(items)]]
    table += _type_rows("answer type", result.per_answer_type, Counter(it.answer_type for it in items))
    table += _type_rows("question type", result.per_question_type, Counter(it.question_type for it in items))
    examples = [
        [Path(r["image"]).name, r["question"], r["prediction"], ", ".join(dict.fromkeys(r["answers"])),
         r["accuracy"]]
        for r in worst_first[:N_EXAMPLES]
    ]
    report = Report(
        "VQA evaluation",
        {"model": model_name, "data": data_name, "questions": len(items), "images": metrics["n_images"],
         "template": f"`{template}`", "generation": gen, "time (s)": metrics["seconds"]},
        [
            ("Accuracy (official VQA accuracy, x100)", md_table(["", "accuracy", "questions"], table)),
            (f"Examples (worst first, {len(examples)} of {len(items)})",
             md_table(["image", "question", "prediction", "answers", "accuracy"], examples)),
            ("Samples", f"![samples]({SAMPLES})\n\nRed frame: not fully right; green: right."),
        ],
    )
    write_report(out_dir / REPORT, report)
    summary = [f"VQA accuracy {result.overall:.2f} on {len(items)} questions of {data_name}"]
    summary += [f"  {kind} {name}: {acc:.2f}" for kind, accs in
                (("answer type", result.per_answer_type), ("question type", result.per_question_type))
                for name, acc in sorted(accs.items())]
    return EvalResult("vqa", out_dir, metrics, summary)
