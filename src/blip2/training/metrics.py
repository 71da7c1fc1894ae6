"""Training logs: one JSON line per logged step (metrics.jsonl), optional TensorBoard, a PNG loss curve.

Only the main process writes. On resume the log is cut back to the resumed step, so a run that crashed
after its last checkpoint does not leave duplicate steps behind. That cut rewrites the whole file, so it goes
through a temporary file and os.replace: a kill at that moment leaves the old history whole, never half of it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, folder: str | os.PathLike, enabled: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._rewrite([])
        else:
            self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is an optional dependency (pip install blip2[train])
                raise RuntimeError(f"tensorboard=true needs the tensorboard package ({err})") from None
            self._tb = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=resume_step)

    def _truncate(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if self.path.exists() else []
        self._rewrite(kept)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        # One fixed temporary name: a copy left by a kill here is simply overwritten by the next start.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return records


def plot_losses(records: Iterable[dict[str, Any]], out: str | os.PathLike,
                keys: tuple[str, ...] = ("loss", "itc", "itm", "itg"), title: str = "training loss") -> Path | None:
    """Loss curves (every key in `keys` that the records hold) against step, as a PNG. None when there is
    nothing to plot."""
    records = list(records)
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k in present:
        pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=1.5 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
