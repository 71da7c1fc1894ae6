"""Caption evaluation: one caption per image, scored with COCO's caption metrics (REFERENCE §6-7).

Images go through `Blip2.caption` in batches of `model.batch_size` (its defaults: 5 beams, at most 30 new
tokens; `prompt` is text the caption continues, left out of the caption as LAVIS does). Scores come from
`blip2.eval.metrics.caption_metrics` (BLEU-1..4, METEOR, ROUGE-L, CIDEr; backend "auto" uses pycocoevalcap
when Java runs, else the pure-Python fallback, and the metrics file says which).

easy-VQA captions also get three exact scores (x100), defined in `blip2.eval.easy_vqa.colour_shape_scores`:
"colour_shape_accuracy", the share of captions whose only colour word is the image's colour and whose only
shape word is the image's shape ("grey" counts as gray; "square" does not count as rectangle), and the
same for colour alone and shape alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip2.eval import easy_vqa
from blip2.eval.datasets import CaptionItem
from blip2.eval.metrics import caption_metrics
from blip2.eval.metrics.caption import cider_d, simple_tokenize
from blip2.eval.report import (
    METRICS, PREDICTIONS, REPORT, SAMPLES, EvalResult, Report, Sample, chunks, md_table, progress_bar,
    sample_grid, write_json, write_jsonl, write_report,
)  # fmt: skip

N_EXAMPLES = 10
N_TILES = 16


def predict_captions(model, items: Sequence[CaptionItem], prompt: str | None = None,
                     generation: dict[str, Any] | None = None, progress: bool | None = None) -> list[str]:
    out: list[str] = []
    with progress_bar(len(items), "captions", "img", progress) as bar:
        for chunk in chunks(items, model.batch_size):
            out += model.caption([it.image for it in chunk], prompt=prompt, **(generation or {}))
            bar.update(len(chunk))
    return out


def _percent(flags: Sequence[bool]) -> float:
    return round(100 * sum(flags) / len(flags), 2)


def evaluate_captions(model, items: Sequence[CaptionItem], out_dir: Path, *, model_name: str = "",
                      data_name: str = "", prompt: str | None = None,
                      generation: dict[str, Any] | None = None, backend: str = "auto",
                      progress: bool | None = None) -> EvalResult:
    """Caption, score, and write predictions / metrics / report / sample grid into `out_dir`."""
    if not items:
        raise ValueError("no images to caption.")
    from blip2.inference.pipeline import CAPTION_DEFAULTS

    model._need_llm()
    start = time.perf_counter()
    captions = predict_captions(model, items, prompt, generation, progress)
    keys = [it.image_id for it in items]
    result = caption_metrics(dict(zip(keys, captions)), {it.image_id: it.references for it in items}, backend)
    # Per-image CIDEr-D with the pure-Python scorer: only to put the worst captions first in the report.
    per_image = cider_d([simple_tokenize(c) for c in captions],
                        [[simple_tokenize(r) for r in it.references] for it in items])[1]
    seconds = time.perf_counter() - start

    rows = [{"image_id": it.image_id, "image": it.image, "prediction": c, "references": it.references}
            for it, c in zip(items, captions)]
    easy = all(it.labels is not None for it in items)
    if easy:  # the image's labels, then the verdicts on the caption
        for row, it in zip(rows, items):
            verdict = easy_vqa.colour_shape_scores(row["prediction"], *it.labels)
            row.update({"colour": it.labels[0], "shape": it.labels[1]})
            row.update({f"{k}_ok": v for k, v in verdict.items()})
    metrics: dict[str, Any] = {
        "task": "caption", "model": model_name, "data": data_name, "n_images": len(items),
        "scores": result.scores, "backend": result.backend, "unavailable": result.unavailable,
    }
    if easy:
        metrics["colour_shape_accuracy"] = _percent([r["colour_shape_ok"] for r in rows])
        metrics["colour_accuracy"] = _percent([r["colour_ok"] for r in rows])
        metrics["shape_accuracy"] = _percent([r["shape_ok"] for r in rows])
    gen = model._generation(CAPTION_DEFAULTS, generation or {})
    gen = {k: v for k, v in gen.items() if k != "pad_token_id"}
    metrics.update({"prompt": prompt, "generation": gen, "seconds": round(seconds, 2)})
    write_jsonl(out_dir / PREDICTIONS, rows)
    write_json(out_dir / METRICS, metrics)

    order = sorted(range(len(rows)), key=lambda i: (rows[i].get("colour_shape_ok", True), per_image[i]))
    tiles = [
        Sample(rows[i]["image"], f"pred: {rows[i]['prediction']}\nref: {rows[i]['references'][0]}",
               rows[i]["colour_shape_ok"] if easy else None)
        for i in order[:N_TILES]
    ]
    sample_grid(out_dir / SAMPLES, tiles, title=f"captions: {data_name} (worst first)")

    table = [[name, f"{value:.4f}"] for name, value in result.scores.items()]
    table += [[name, f"n/a ({why})"] for name, why in result.unavailable.items()]
    if easy:
        table += [["colour-and-shape accuracy (x100)", metrics["colour_shape_accuracy"]],
                  ["colour accuracy (x100)", metrics["colour_accuracy"]],
                  ["shape accuracy (x100)", metrics["shape_accuracy"]]]
    examples = [[Path(rows[i]["image"]).name, rows[i]["prediction"], " / ".join(rows[i]["references"][:2]),
                 per_image[i]] for i in order[:N_EXAMPLES]]
    report = Report(
        "Caption evaluation",
        {"model": model_name, "data": data_name, "images": len(items), "prompt": prompt or "(none)",
         "generation": metrics["generation"], "metrics backend": result.backend,
         "time (s)": metrics["seconds"]},
        [
            ("Metrics (pycocoevalcap scale: BLEU in [0, 1], CIDEr in [0, 10])",
             md_table(["metric", "value"], table)),
            (f"Examples (worst first, {len(examples)} of {len(items)})",
             md_table(["image", "prediction", "references", "CIDEr-D of this image (approx.)"], examples)),
            ("Samples", f"![samples]({SAMPLES})"
             + ("\n\nRed frame: colour or shape wrong; green: both right." if easy else "")),
        ],
    )
    write_report(out_dir / REPORT, report)
    summary = [f"captions of {len(items)} images of {data_name} ({result.backend}):"]
    summary += ["  " + "  ".join(f"{k} {v:.4f}" for k, v in result.scores.items())]
    if easy:
        summary.append(f"  colour-and-shape accuracy {metrics['colour_shape_accuracy']:.2f}")
    return EvalResult("caption", out_dir, metrics, summary)
