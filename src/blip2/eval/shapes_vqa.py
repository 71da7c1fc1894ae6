"""`shapes-vqa:test`: VQA on images easy-VQA never drew, rendered by our own blip2.data.shapes.

200 images (each colour 25 times, each shape 66-67 times, every colour-shape pair 8-9 times) and three
questions about each, of easy-VQA's three kinds: its colour, its shape, and a yes/no question about a colour
or a shape (true half the time, negated half the time): 600 questions. The set is fixed by its seed; it is
rendered on first use into `$BLIP2_CACHE/shapes-vqa/` (default `~/.cache/blip2`) as PNG files and a VQA JSONL
(`questions.jsonl`, also usable as `--data` directly), which later runs reuse.

`python -m blip2.eval.shapes_vqa RUN_DIR` adds what `blip2 eval vqa` does not report: accuracy per colour and
per shape of the image, and which wrong answers the colour and shape questions got (`breakdown.json`/`.md`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from blip2.data import shapes
from blip2.eval.metrics.vqa import vqa_score

SPLITS = ("test",)
IMAGES = {"test": 200}
SEEDS = {"test": "shapes-vqa:test"}  # training renders draw from other seeds (recipes/default_model.py)
KINDS = ("colour", "shape", "yes/no")
# Bump when the renderer or the questions change: a cached set of another version is not reused.
VERSION = 1
QUESTIONS = "questions.jsonl"


def folder(split: str) -> Path:
    base = Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2"))
    return base / "shapes-vqa" / f"{split}-v{VERSION}"


def build(split: str) -> Path:
    """The split's folder, rendered first if it is not there yet (written aside, then renamed into place, so
    concurrent first uses never see half a set)."""
    if split not in SPLITS:
        raise ValueError(f"shapes-vqa has no split {split!r}; use shapes-vqa:test.")
    target = folder(split)
    if (target / QUESTIONS).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=target.parent))
    rendered = shapes.render_set(tmp / "images", shapes.balanced_labels(IMAGES[split]), SEEDS[split], KINDS)
    with (tmp / QUESTIONS).open("w") as f:
        for number, img in enumerate(rendered):
            for k, q in enumerate(img.questions):
                f.write(json.dumps({
                    "question_id": 3 * number + k, "image": f"images/{img.image}", "question": q.question,
                    "answers": [q.answer], "question_type": q.kind,
                    "answer_type": "yes/no" if q.kind == "yes/no" else "other",
                    "colour": img.colour, "shape": img.shape,
                }) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: its copy is the same set
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def labels(split: str) -> dict[str, tuple[str, str]]:
    """{absolute image path: (colour, shape)} of a split."""
    root = build(split)
    out = {}
    for line in (root / QUESTIONS).read_text().splitlines():
        row = json.loads(line)
        out[str(root / row["image"])] = (row["colour"], row["shape"])
    return out


# --------------------------------------------------------------------------------------------- breakdown


def breakdown(rows: list[dict[str, Any]], image_labels: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Per colour and per shape of the image: accuracy over all its questions and over the questions of
    that kind; the wrong answers to colour and shape questions as "truth -> answer" counts."""
    by_colour: dict[str, list[float]] = defaultdict(list)
    by_shape: dict[str, list[float]] = defaultdict(list)
    colour_q: dict[str, list[float]] = defaultdict(list)
    shape_q: dict[str, list[float]] = defaultdict(list)
    confusions: dict[str, Counter] = {"colour": Counter(), "shape": Counter(), "yes/no": Counter()}
    for row in rows:
        colour, shape = image_labels[row["image"]]
        right = vqa_score(row["prediction"], row["answers"])
        by_colour[colour].append(right)
        by_shape[shape].append(right)
        kind = row["question_type"]
        if kind == "colour":
            colour_q[colour].append(right)
        elif kind == "shape":
            shape_q[shape].append(right)
        if right < 1:
            what = f"{row['answers'][0]} -> {row['prediction'].strip().lower()}"
            confusions[kind][what if kind != "yes/no" else f"{colour} {shape}: {row['question']} {what}"] += 1

    def pct(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        return {k: {"accuracy": round(100 * sum(v) / len(v), 2), "questions": len(v)}
                for k, v in sorted(values.items())}

    return {
        "per_image_colour": pct(by_colour), "per_image_shape": pct(by_shape),
        "colour_questions_per_colour": pct(colour_q), "shape_questions_per_shape": pct(shape_q),
        "wrong": {k: dict(c.most_common()) for k, c in confusions.items()},
    }


def _cell(entry: dict[str, float] | None) -> str:
    return f"{entry['accuracy']:.2f} ({entry['questions']})" if entry else ""


def _markdown(result: dict[str, Any]) -> str:
    lines = ["# shapes-vqa: per colour and per shape (accuracy, questions)", ""]
    tables = (("colour", shapes.COLOURS, "per_image_colour", "colour_questions_per_colour"),
              ("shape", shapes.SHAPES, "per_image_shape", "shape_questions_per_shape"))
    for name, values, per_image, per_kind in tables:
        lines += [f"| {name} | all questions | {name} questions |", "|---|---:|---:|"]
        lines += [f"| {v} | {_cell(result[per_image].get(v))} | {_cell(result[per_kind].get(v))} |"
                  for v in values if v in result[per_image]]
        lines.append("")
    for kind, wrong in result["wrong"].items():
        lines += [f"Wrong answers to {kind} questions ({sum(wrong.values())}):", ""]
        lines += [f"- {w}: {n}" for w, n in wrong.items()] or ["- none"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m blip2.eval.shapes_vqa RUN_DIR  (the --out folder of a "
              "`blip2 eval vqa --data shapes-vqa:test` run)", file=sys.stderr)
        return 2
    run = Path(args[0])
    predictions = run / "predictions.jsonl"
    if not predictions.is_file():
        print(f"error: {predictions} does not exist: give the output folder of a shapes-vqa evaluation.",
              file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    result = breakdown(rows, labels("test"))
    (run / "breakdown.json").write_text(json.dumps(result, indent=2) + "\n")
    text = _markdown(result)
    (run / "breakdown.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
