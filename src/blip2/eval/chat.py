"""Multi-turn chat evaluation: one `Blip2.chat` session per conversation, its questions asked in order.

Each turn's answer is scored against its references with the VQA accuracy (`vqa_score`, x100). The earlier
turns reach the LLM as the session builds them ("Question: q Answer: a." with the model's own answers), so a
follow-up like "what color is it?" is scored in context. Reported: accuracy per turn position, over all
turns, and the share of conversations with every turn fully right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip2.eval.datasets import ChatItem
from blip2.eval.metrics.vqa import vqa_score
from blip2.eval.report import (
    METRICS, PREDICTIONS, REPORT, SAMPLES, EvalResult, Report, Sample, md_table, progress_bar, sample_grid,
    write_json, write_jsonl, write_report,
)  # fmt: skip

N_EXAMPLES = 10
N_TILES = 16


def _tile_text(row: dict[str, Any]) -> str:
    return "\n".join(f"Q: {t['question']}\npred: {t['prediction']} (ref: {t['answers'][0]})" for t in row["turns"])


def evaluate_chat(model, items: Sequence[ChatItem], out_dir: Path, *, model_name: str = "", data_name: str = "",
                  generation: dict[str, Any] | None = None, progress: bool | None = None) -> EvalResult:
    """Run every conversation, score each turn, and write predictions / metrics / report / sample grid."""
    if not items:
        raise ValueError("no conversations to evaluate.")
    from blip2.inference.pipeline import VQA_DEFAULTS

    used = {k: v for k, v in model._generation(VQA_DEFAULTS, generation or {}).items() if k != "pad_token_id"}
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with progress_bar(len(items), "chat", "conversation", progress) as bar:
        for item in items:
            session = model.chat(item.image, **(generation or {}))
            turns = []
            for question, answers in item.turns:
                prediction = session.ask(question)
                turns.append({"question": question, "prediction": prediction, "answers": answers,
                              "accuracy": 100.0 * vqa_score(prediction, answers)})
            rows.append({"conversation_id": item.conversation_id, "image": item.image, "turns": turns,
                         "all_right": all(t["accuracy"] >= 100 for t in turns)})
            bar.update(1)
    seconds = time.perf_counter() - start

    n_turns = max(len(r["turns"]) for r in rows)
    per_turn = {}
    for k in range(n_turns):
        scores = [r["turns"][k]["accuracy"] for r in rows if len(r["turns"]) > k]
        per_turn[str(k + 1)] = round(sum(scores) / len(scores), 2)
    every = [t["accuracy"] for r in rows for t in r["turns"]]
    metrics = {
        "task": "chat", "model": model_name, "data": data_name, "n_conversations": len(rows), "n_turns": len(every),
        "turn_accuracy": round(sum(every) / len(every), 2), "per_turn_accuracy": per_turn,
        "conversation_accuracy": round(100.0 * sum(r["all_right"] for r in rows) / len(rows), 2),
        "generation": used, "seconds": round(seconds, 2),
    }
    write_jsonl(out_dir / PREDICTIONS, rows)
    write_json(out_dir / METRICS, metrics)

    worst_first = sorted(rows, key=lambda r: r["all_right"])  # stable: data order within each group
    tiles = [Sample(r["image"], _tile_text(r), r["all_right"]) for r in worst_first[:N_TILES]]
    sample_grid(out_dir / SAMPLES, tiles, title=f"chat: {data_name} (wrong first)")
    table = [[f"turn {k}", acc] for k, acc in per_turn.items()]
    table += [["all turns", metrics["turn_accuracy"]], ["whole conversations right", metrics["conversation_accuracy"]]]
    examples = [
        [Path(r["image"]).name, " / ".join(t["question"] for t in r["turns"]),
         " / ".join(t["prediction"] for t in r["turns"]), " / ".join(t["answers"][0] for t in r["turns"])]
        for r in worst_first[:N_EXAMPLES]
    ]
    report = Report(
        "Chat evaluation",
        {"model": model_name, "data": data_name, "conversations": len(rows), "turns": len(every),
         "generation": used, "time (s)": metrics["seconds"]},
        [
            ("Accuracy (VQA accuracy per turn, x100)", md_table(["", "accuracy"], table)),
            (f"Examples (wrong first, {len(examples)} of {len(rows)})",
             md_table(["image", "questions", "predictions", "references"], examples)),
            ("Samples", f"![samples]({SAMPLES})\n\nRed frame: a turn not fully right; green: all right."),
        ],
    )
    write_report(out_dir / REPORT, report)
    summary = [f"chat: {len(rows)} conversations of {data_name}: turn accuracy {metrics['turn_accuracy']:.2f}, "
               f"whole conversations right {metrics['conversation_accuracy']:.2f}"]
    summary += [f"  turn {k}: {acc:.2f}" for k, acc in per_turn.items()]
    return EvalResult("chat", out_dir, metrics, summary)
