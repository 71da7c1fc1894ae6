"""Where labels go, written so that a kill -9 at any moment leaves every file whole and a rerun resumes.

- `SidecarWriter`: `<stem><ext>` next to each image (`photo.jpg` -> `photo.txt`, the kohya convention), each
  written to a temp file in the same folder, fsynced, then `os.replace`d over the old one: a reader sees the
  old text or the new, never half. Temp files a killed run left behind are removed by the next run.
- `ManifestWriter`: one row per image in a JSONL or CSV file, appended a batch at a time as whole lines, then
  flushed and fsynced. A kill can leave at most a partial last line; the next run cuts it off before appending.
  A path labeled again (`--overwrite`, `--retry-failed`) gets a new row; the last row of a path wins, and the
  end of a run compacts the file to one row per path (atomically). Parquet cannot be appended to: its rows go
  to a JSONL journal beside it (`labels.parquet.journal.jsonl`, the resume state), and every run ends by
  writing the parquet file atomically from the journal.
- `AppendJournal`: what an --append/--prepend run has written, so that the rerun of a killed run does not add
  its label a second time to the images it already reached (`label_images` keeps it; see there).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from blip2.data.durable import fsync_dir

COLUMNS = ("path", "task", "prompt", "question", "label", "model", "generation", "status", "error")
ONE_LINE = ("prompt", "question", "label", "error")  # CSV: whitespace collapsed (paths are kept as they are)
TEMP_SUFFIX = ".blip2-tmp"
MANIFEST_FORMATS = (".jsonl", ".csv", ".parquet")


# ------------------------------------------------------------------------------------------ atomic files


def _temp_name(target: Path) -> Path:
    # The pid lets a later run tell a dead run's leftovers from a live run's file in progress.
    return target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")


def atomic_write(target: Path, data: bytes) -> None:
    """`target` holds `data` afterwards, or its old content if we are killed first; never a mix."""
    temp = _temp_name(target)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files that killed runs left in `folder` (ours by suffix; only those of dead processes)."""
    removed = 0
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    except OSError:
        return 0
    for path in candidates:
        pid = path.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cut_partial_line(path: Path) -> bool:
    """If `path` does not end with a newline (a write cut by a kill), truncate it after its last newline."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        block, end = 1 << 16, f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:  # search backwards for the last newline, a block at a time
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                break
            pos = start
        else:
            f.truncate(0)
        f.flush()
        os.fsync(f.fileno())
    return True


# -------------------------------------------------------------------------------------------- sidecars


class SidecarWriter:
    """Labels as text files next to the images. `done(path)`: its sidecar exists."""

    def __init__(self, ext: str = ".txt") -> None:
        self.ext = ext
        self.cleaned: set[Path] = set()

    def sidecar(self, image: Path) -> Path:
        return image.with_name(image.stem + self.ext)

    def prepare(self, images: Sequence[Path]) -> None:
        for folder in {p.parent for p in images}:
            remove_stale_temps(folder)

    def done(self, image: Path) -> bool:
        return self.sidecar(image).is_file()

    def stored(self, label: str) -> str:
        """What `existing` reads back after `label` is written: the same text."""
        return label

    def existing(self, image: Path) -> str | None:
        try:
            return self.sidecar(image).read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            return None

    def write(self, rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        """Write the ok rows' labels; returns (row, error) for each sidecar that could not be written."""
        failed, folders = [], set()
        for row in rows:
            if row["status"] != "ok":
                continue
            target = self.sidecar(Path(row["path"]))
            try:
                atomic_write(target, row["label"].encode("utf-8"))
                folders.add(target.parent)
            except OSError as err:
                why = f"{type(err).__name__}: {err.strerror or err}"
                failed.append((row, f"cannot write sidecar {target} ({why})"))
        for folder in folders:
            fsync_dir(folder)
        return failed

    def finish(self) -> None:
        pass

    def describe(self) -> str:
        return f"sidecar files (*{self.ext})"


# ------------------------------------------------------------------------------------------- manifests


def _key(path: str | Path) -> str:
    return os.path.abspath(path)


class ManifestWriter:
    """Labels as rows of one JSONL / CSV file (or parquet, through a JSONL journal)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.format = self.out.suffix.lower()
        if self.format not in MANIFEST_FORMATS:
            raise ValueError(f"--out {out}: a manifest must end with {', '.join(MANIFEST_FORMATS)}")
        if self.format == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"--out {out}: parquet needs pyarrow (pip install 'blip2[collections]'), or use .jsonl/.csv"
                ) from None
        self.log = self.out.with_name(self.out.name + ".journal.jsonl") if self.format == ".parquet" else self.out
        self.rows: dict[str, dict[str, Any]] = {}  # last row per path
        self.count = 0  # rows in the log, duplicates included

    def prepare(self, images: Sequence[Path]) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out.parent)
        cut_partial_line(self.log)
        for row in self._read():
            self.rows[_key(row["path"])] = row
            self.count += 1

    def _read(self) -> Iterable[dict[str, Any]]:
        if not self.log.exists():
            return []
        text = self.log.read_text(encoding="utf-8")
        text = text[: text.rfind("\n") + 1]  # a partial last line (a killed write) is not a row
        if self.format == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            for row in rows:
                row["generation"] = json.loads(row["generation"] or "{}")
                for name in ("prompt", "question", "error"):
                    row[name] = row[name] or None
            return rows
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.log} line {number} is not JSON ({err}); fix or move it") from None
        return out

    def row(self, image: Path) -> dict[str, Any] | None:
        return self.rows.get(_key(image))

    def done(self, image: Path, retry_failed: bool = False) -> bool:
        row = self.row(image)
        return row is not None and (row["status"] == "ok" or not retry_failed)

    def existing(self, image: Path) -> str | None:
        row = self.row(image)
        return row["label"] if row is not None and row["status"] == "ok" else None

    def stored(self, label: str) -> str:
        """What `existing` reads back after `label` is written (CSV keeps one line per row)."""
        return " ".join(label.split()) if self.format == ".csv" else label

    def _encode(self, rows: Sequence[dict[str, Any]], header: bool) -> bytes:
        if self.format != ".csv":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        if header:
            writer.writeheader()
        for r in rows:
            flat = {**r, "generation": json.dumps(r["generation"], sort_keys=True)}
            # One row, one line: a partial last line is then a partial row, and cutting it is enough.
            flat.update({k: " ".join(flat[k].split()) for k in ONE_LINE if isinstance(flat[k], str)})
            writer.writerow(flat)
        return buf.getvalue().encode("utf-8")

    def write(self, rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        if not rows:
            return []
        header = self.format == ".csv" and (not self.log.exists() or self.log.stat().st_size == 0)
        data = self._encode(rows, header)
        with open(self.log, "ab") as f:
            f.write(data)  # whole lines, in one call; a kill can cut only the last one
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[_key(r["path"])] = r
            self.count += 1
        return []

    def finish(self) -> None:
        """One row per path: compact the log if a path was labeled twice; parquet: write it from the journal."""
        if self.count > len(self.rows) and self.log.exists():
            atomic_write(self.log, self._encode(list(self.rows.values()), header=True))
            self.count = len(self.rows)
        if self.format == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [{**r, "generation": json.dumps(r["generation"], sort_keys=True)} for r in self.rows.values()]
            table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in COLUMNS]))
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            atomic_write(self.out, buf.getvalue().to_pybytes())
        fsync_dir(self.out.parent)

    def describe(self) -> str:
        return str(self.out) if self.log == self.out else f"{self.out} (journal {self.log.name})"


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a manifest (.jsonl, .csv or .parquet) as dicts, `generation` parsed, one per path."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [{**r, "generation": json.loads(r["generation"] or "{}")} for r in rows]
    writer = ManifestWriter(path)
    writer.log = path
    return list({_key(r["path"]): r for r in writer._read()}.values())


# ------------------------------------------------------------------------------- append/prepend journal


class AppendJournal:
    """The labels an --append/--prepend run is writing, so its rerun after a kill adds each label once.

    Skipping images that have a label (what makes `skip` resumable) cannot work here: every image had one
    before the run. So before a batch's labels are written, one JSON line per image, {"path", "text"} with
    `text` the image's whole label as it will be stored (old text + separator + new label), is appended and
    fsynced. A rerun skips an image whose current label is exactly its journaled text (written before the
    kill) and labels again one whose label is anything else (the kill came between journal and label: the
    label is still the old one; or someone edited it since). The journal is deleted when a run finishes, so
    the same command run again later appends again, as asked; its name carries a hash of the run's settings,
    so a killed run with other settings (another question, model or separator) never marks images done.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.texts: dict[str, str] = {}

    def load(self) -> None:
        """Read a killed run's journal; a partial last line (killed mid-write) is cut off, as in manifests."""
        if not self.path.exists():
            return
        cut_partial_line(self.path)
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.texts[_key(entry["path"])] = entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path} line {number} is not a journal entry; delete the file to start "
                                 "over (images it covers would then get the label again)") from None

    def done(self, image: Path, current: str | None) -> bool:
        """The run that wrote this journal already stored this image's label."""
        text = self.texts.get(_key(image))
        return text is not None and current == text

    def record(self, entries: Sequence[tuple[Path, str]]) -> None:
        """(image, stored text) for a batch, durable before its labels are written."""
        if not entries:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            # json's default ASCII escapes keep one entry on one line (a raw U+2028 would split it)
            f.write("".join(json.dumps({"path": _key(p), "text": t}) + "\n" for p, t in entries))
            f.flush()
            os.fsync(f.fileno())
        for image, text in entries:
            self.texts[_key(image)] = text

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
