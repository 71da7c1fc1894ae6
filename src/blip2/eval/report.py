"""What an evaluation run writes: predictions JSONL, metrics JSON, a markdown report and a PNG grid.

Every runner writes the same four files into its output folder (`outputs/eval-<task>-<timestamp>` unless
told otherwise), so a run can be compared, re-scored or looked at later without the model.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
SAMPLES = "samples.png"


def default_out_dir(task: str, base: str | os.PathLike = "outputs") -> Path:
    """outputs/eval-<task>-<YYYYmmdd-HHMMSS>, with -2, -3... when that folder already exists."""
    stem = Path(base) / f"eval-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():
        n += 1
        out = Path(f"{stem}-{n}")
    return out


def check_out_dir(out_dir: str | os.PathLike | None) -> None:
    """Fail before any compute when the output folder cannot be one."""
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder to write the results into.")


def prepare_out_dir(out_dir: str | os.PathLike | None, task: str) -> Path:
    check_out_dir(out_dir)
    out = Path(out_dir) if out_dir is not None else default_out_dir(task)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------ markdown


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """A markdown report: a title, the run's facts, then sections (heading, body)."""

    title: str
    facts: dict[str, Any]
    sections: list[tuple[str, str]]

    def markdown(self) -> str:
        parts = [f"# {self.title}", ""]
        parts += [f"- **{key}**: {_cell(value)}" for key, value in self.facts.items()]
        for heading, body in self.sections:
            parts += ["", f"## {heading}", "", body]
        return "\n".join(parts) + "\n"


def write_report(path: Path, report: Report) -> None:
    path.write_text(report.markdown())


# ----------------------------------------------------------------------------------------------- PNG grids


@dataclass
class Sample:
    """One tile: an image, the text under it, and whether the prediction was right (None: no verdict)."""

    image: str
    text: str
    correct: bool | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _show(ax, path: str, correct: bool | None, text: str, width: int) -> None:
    from PIL import Image

    with Image.open(path) as im:
        ax.imshow(im.convert("RGB"))
    ax.set_xticks([])
    ax.set_yticks([])
    colour = {True: "tab:green", False: "tab:red", None: "black"}[correct]
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3 if correct is not None else 1)
    wrapped = "\n".join(textwrap.fill(line, width) for line in text.splitlines())
    ax.set_title(wrapped, fontsize=7, color=colour if correct is False else "black")


def sample_grid(path: Path, samples: Sequence[Sample], columns: int = 4, title: str | None = None) -> None:
    """Tiles with their texts; a red frame marks a wrong prediction, a green one a right one."""
    if not samples:
        return
    plt = _pyplot()
    columns = min(columns, len(samples))
    rows = math.ceil(len(samples) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.axis("on")
        _show(ax, s.image, s.correct, s.text, width=30)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def retrieval_grid(path: Path, queries: Sequence[tuple[str, Sequence[Sample]]],
                   title: str | None = None) -> None:
    """One row per query text: its top images left to right, framed green when they match the text."""
    if not queries:
        return
    plt = _pyplot()
    columns = max(len(hits) for _, hits in queries)
    fig, axes = plt.subplots(len(queries), columns + 1, figsize=(2.0 * (columns + 1), 2.2 * len(queries)),
                             squeeze=False)
    for row, (text, hits) in zip(axes, queries):
        for ax in row:
            ax.axis("off")
        row[0].text(0.5, 0.5, textwrap.fill(text, 22), ha="center", va="center", fontsize=8, wrap=True)
        for ax, s in zip(row[1:], hits):
            ax.axis("on")
            _show(ax, s.image, s.correct, s.text, width=22)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wrong_first(samples: Sequence[Sample], n: int) -> list[Sample]:
    """Up to n samples: the wrong ones in their order, then the others."""
    wrong = [s for s in samples if s.correct is False]
    rest = [s for s in samples if s.correct is not False]
    return (wrong + rest)[:n]


@dataclass
class EvalResult:
    """What a runner returns: the task, where it wrote, the metrics it wrote and a few summary lines."""

    task: str
    out_dir: Path
    metrics: dict[str, Any]
    summary: list[str]


def progress_bar(total: int, desc: str, unit: str, progress: bool | None):
    """tqdm on stderr; progress None shows it on a terminal only (quiet in logs and tests)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress is None else not progress)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
