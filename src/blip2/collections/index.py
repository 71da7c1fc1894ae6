"""The photo index: a folder that maps a collection's images to their ITC query vectors (DESIGN §4).

    INDEX/
      meta.json        format, model fingerprint, embedding dim, queries per image, requested kind
      images.sqlite    one row per file: id, absolute path, size, mtime_ns, sha256, status ('ok' | 'error'), error
      vectors.faiss    every query vector of every 'ok' image, under ids image_id * Q + q (collections.vectors)

`update_index` brings an index in line with folders: new files are embedded, deleted ones removed, changed
ones (size or mtime moved and the content hash differs) re-embedded, unreadable ones recorded with their error.
It commits as it goes: first the vectors file (temp + fsync + rename), then the table in one SQLite
transaction. A kill between the two is repaired on the next open: vectors whose image the table does not list
are dropped, and 'ok' rows whose vectors are missing are embedded again. A re-embedded image keeps its id, so
a kill after the vectors were written leaves the old size/mtime in the table and the next run embeds it again.
An index belongs to one model (its fingerprint): another model is refused rather than mixing vector spaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from blip2.collections import vectors as vec

if TYPE_CHECKING:
    from blip2.collections.reader import Decoded

FORMAT = 1
META, TABLE, VECTORS = "meta.json", "images.sqlite", "vectors.faiss"
SCHEMA = """CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT, status TEXT NOT NULL, error TEXT)"""
FINGERPRINT_SAMPLES = 64  # values read from each tensor


class IndexMismatchError(ValueError):
    """The index was built with another model (or is not an index at all)."""


# ------------------------------------------------------------------------------------------- the model


def model_fingerprint(blip2) -> str:
    """A short, deterministic identity of what makes the image and text ITC vectors: the vision/Q-Former
    config, and evenly spaced samples of every Q-Former-side tensor (queries, Q-Former, projections, text
    embeddings). The frozen LLM plays no part, and the frozen vision tower enters through its config (its
    weights are cast to the run's dtype, which must not change the identity). Milliseconds, any model size."""
    model = blip2.model
    cfg = model.config.to_dict()
    ident = {k: cfg.get(k) for k in ("vision", "qformer", "num_query_tokens", "image_text_hidden_size")}
    h = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("language_model.", "language_projection.", "vision_model.")):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].float().cpu().numpy()
        h.update(f"{name}{tuple(tensor.shape)}".encode() + sample.tobytes())
    return h.hexdigest()[:16]


def _need_itc(blip2) -> None:
    if not blip2.model.config.stage1_heads:
        raise ValueError("this model has no ITC/ITM heads: the photo index needs a stage-1 or retrieval "
                         "checkpoint (the default model has them)")


@torch.no_grad()
def embed_pixels(blip2, pixels: torch.Tensor) -> np.ndarray:
    """pixels (B, 3, S, S) -> normalised ITC query vectors (B, Q, E) float32, as `Blip2.similarity` makes them."""
    model = blip2.model
    dtype = next(model.vision_model.parameters()).dtype
    feats = model.encode_image(pixels.to(blip2.device, dtype))  # (B, N, Dv)
    return model.image_itc_features(model.query(feats).hidden).float().cpu().numpy()  # (B, Q, E)


Embedded = tuple[Path, "np.ndarray | None", "str | None"]  # a file's (path, ITC vectors (Q, E) or None, error)


def embed_decoded(blip2, batch: Sequence[Decoded]) -> list[Embedded]:
    """One batch of decoded files -> (path, vectors (Q, E) float32, None), or (path, None, error) for bad files."""
    ok = [d for d in batch if d.pixels is not None]
    feats = iter(embed_pixels(blip2, torch.stack([d.pixels for d in ok])) if ok else ())  # (B, Q, E)
    return [(d.path, next(feats), None) if d.pixels is not None else (d.path, None, d.error) for d in batch]


def embed_files(blip2, files: Sequence[Path], batch_size: int, workers: int | None = None) -> Iterator[list[Embedded]]:
    """`update_index`'s vectors on one machine: `workers` processes decode ahead, this one embeds."""
    from blip2.collections.reader import decode_stream

    batch: list[Decoded] = []
    for item in decode_stream(files, blip2.model.config.vision.image, workers=workers):
        batch.append(item)
        if len(batch) == batch_size:
            yield embed_decoded(blip2, batch)
            batch = []
    if batch:
        yield embed_decoded(blip2, batch)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the folder


@dataclass
class Row:
    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    status: str  # "ok" | "error"
    error: str | None = None


class PhotoIndex:
    """An open index folder. `PhotoIndex.open(folder)` to search; `update_index` to build or refresh."""

    def __init__(self, folder: Path, meta: dict, db: sqlite3.Connection, index) -> None:
        self.folder, self.meta, self.db, self.vectors = folder, meta, db, index
        ok = {r[0] for r in db.execute("SELECT id FROM images WHERE status = 'ok'")}
        stored = set(np.unique(vec.all_ids(index) // self.num_queries).tolist())
        # Repair after a kill between writing the vectors and committing the table (module docstring).
        self.vectors = vec.remove(index, stored - ok, self.num_queries)
        self.missing = ok - stored  # 'ok' rows without vectors: update_index embeds them again
        self.repaired = len(stored - ok) + len(self.missing)

    # -- opening ---------------------------------------------------------------------------------------------
    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return (Path(folder) / META).is_file()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> PhotoIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"index {folder} does not exist (build it with `blip2 index IMAGES… --out {folder}`)")
        if not (folder / META).is_file():
            raise IndexMismatchError(f"{folder} is not a photo index (no {META}; build one with `blip2 index`)")
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT:
            raise IndexMismatchError(f"index {folder} has format {meta.get('format')}, this blip2 reads {FORMAT}")
        # check_same_thread=False: a server opens the index once and searches from its model worker thread
        # (one call at a time); SQLite's own serialized mode keeps the connection safe across threads.
        db = sqlite3.connect(folder / TABLE, check_same_thread=False)
        db.execute(SCHEMA)
        path = folder / VECTORS
        # A new index starts exact (IVF needs vectors to train on; `commit` converts), or as an empty HNSW graph.
        index = vec.read(path) if path.is_file() else vec.new_index("hnsw" if meta["kind"] == "hnsw" else "exact", meta["dim"])
        return cls(folder, meta, db, index)

    @classmethod
    def create(cls, folder: str | os.PathLike, fingerprint: str, dim: int, num_queries: int, kind: str = "auto",
               model: str | None = None) -> PhotoIndex:
        if kind not in vec.KINDS:
            raise ValueError(f"unknown index kind {kind!r} (known: {', '.join(vec.KINDS)})")
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not (folder / META).is_file():
            raise IndexMismatchError(f"{folder} exists and is not a photo index: give a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "fingerprint": fingerprint, "model": model, "dim": dim,
                "num_queries": num_queries, "kind": kind}
        _write_json(folder / META, meta)
        return cls.open(folder)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> PhotoIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds ---------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def num_queries(self) -> int:
        return self.meta["num_queries"]

    @property
    def structure(self) -> str:
        return vec.structure_of(self.vectors)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0] - len(self.missing)

    def rows(self) -> dict[str, Row]:
        return {r[1]: Row(*r) for r in self.db.execute("SELECT id, path, size, mtime_ns, sha256, status, error FROM images")}

    def paths(self, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        ids = list(ids)
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            out.update(self.db.execute(f"SELECT id, path FROM images WHERE id IN ({marks})", part).fetchall())
        return out

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            built = f" ({self.meta['model']})" if self.meta.get("model") else ""
            raise IndexMismatchError(
                f"index {self.folder} was built with another model{built}, fingerprint {self.fingerprint}; this "
                f"model's is {fingerprint}. Use the same --model, or index into a new --out folder"
            )

    def search_vectors(self, queries: np.ndarray, k: int) -> list[tuple[int, float]]:
        """[(image_id, score)] for query vectors (m, E): max over the image's queries and the m vectors."""
        return vec.search(self.vectors, queries, k, self.num_queries)

    # -- changing it -----------------------------------------------------------------------------------------
    def next_id(self) -> int:
        top = self.db.execute("SELECT MAX(id) FROM images").fetchone()[0]
        return 0 if top is None else top + 1

    def commit(self, upserts: Sequence[Row], deletes: Sequence[int]) -> None:
        """Persist: the vectors file first (switching structure if the collection outgrew it), then the
        table changes in one transaction (module docstring)."""
        n_ok = len(self) + len(upserts)  # upper bound is enough to pick a structure
        wanted = vec.wanted_structure(self.meta["kind"], n_ok)
        if wanted != self.structure and self.vectors.ntotal > 0:
            self.vectors = vec.convert(self.vectors, wanted)
        elif wanted == "ivf" and vec.ivf_lists(self.vectors.ntotal) >= 4 * self.vectors.nlist:
            self.vectors = vec.convert(self.vectors, "ivf")  # grown 16x since its lists were trained: retrain
        vec.write_atomic(self.vectors, self.folder / VECTORS)
        with self.db:
            self.db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in deletes])
            self.db.executemany(
                "INSERT OR REPLACE INTO images (id, path, size, mtime_ns, sha256, status, error) VALUES (?,?,?,?,?,?,?)",
                [(r.id, r.path, r.size, r.mtime_ns, r.sha256, r.status, r.error) for r in upserts],
            )
        self.missing -= {r.id for r in upserts} | set(deletes)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- updating


@dataclass
class UpdateReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    repaired: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of this run's bad files
    images: int = 0  # 'ok' images in the index afterwards
    structure: str = "exact"
    seconds: float = 0.0
    embedded_per_s: float = 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "failed": [{"path": p, "error": e} for p, e in self.failed]}


def update_index(
    blip2,
    folder: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    recursive: bool = False,
    files_from: str | os.PathLike | None = None,
    kind: str | None = None,
    prune: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    commit_every: float = 30.0,
    progress: bool | None = None,
    model_name: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    embed: Callable[[list[Path]], Iterable[list[Embedded]]] | None = None,
) -> UpdateReport:
    """Create or refresh the index in `folder` from the images of `inputs` (files and folders).

    Rows whose file no longer exists are removed; with `prune`, so is every row not among this run's inputs.
    `kind` (auto, exact, hnsw, ivf; None keeps the index's, "auto" for a new one) may change an existing
    index's structure. Commits happen every `commit_every` seconds (at least 10x the time the last commit
    took, so that writing the vectors file stays a small part of the run; 0: after every batch) and at the
    end; a killed run redoes at most the work since its last commit. `on_batch(n_done)` is called after every batch.
    `embed(files)`: where the vectors come from, batches of (path, vectors (Q, E) or None, error) for `files`
    in any order (default `embed_files`: decoded in `workers` processes, embedded here; `ray_jobs.index_with_ray`
    passes a Ray Data pipeline). This process stays the index's only writer either way.
    """
    from tqdm.auto import tqdm

    from blip2.collections.reader import find_images

    _need_itc(blip2)
    start = time.perf_counter()
    fingerprint = model_fingerprint(blip2)
    files = [Path(os.path.abspath(p)) for p in find_images(inputs, recursive=recursive, files_from=files_from)]
    model = blip2.model
    dim, q = model.config.image_text_hidden_size, model.num_queries
    kind_changed = False
    if PhotoIndex.exists(folder):
        index = PhotoIndex.open(folder)
        index.check_model(fingerprint)
        if kind is not None and kind != index.meta["kind"]:
            if kind not in vec.KINDS:
                raise ValueError(f"unknown index kind {kind!r} (known: {', '.join(vec.KINDS)})")
            index.meta["kind"], kind_changed = kind, True
            _write_json(index.folder / META, index.meta)
    else:
        index = PhotoIndex.create(folder, fingerprint, dim, q, kind or "auto", model=model_name)
    report = UpdateReport(repaired=index.repaired)
    try:
        rows = index.rows()
        wanted = {str(p) for p in files}
        gone = [r for path, r in rows.items() if path not in wanted and (prune or not os.path.exists(path))]
        if gone:
            index.vectors = vec.remove(index.vectors, [r.id for r in gone if r.status == "ok"], q)
            index.commit([], [r.id for r in gone])
            report.removed = len(gone)

        todo: list[tuple[Path, Row]] = []  # files to embed, with the row they will have
        touched: list[Row] = []  # same content, new size/mtime: only the table changes
        next_id = index.next_id()
        for path in files:
            try:
                st = path.stat()
            except OSError:
                st = None
            size, mtime = (st.st_size, st.st_mtime_ns) if st else (-1, -1)
            old = rows.get(str(path))
            if old is not None and (old.size, old.mtime_ns) == (size, mtime) and old.id not in index.missing:
                report.unchanged += 1
                continue
            digest = file_sha256(path) if st else None
            if old is not None and old.status == "ok" and old.sha256 == digest and old.id not in index.missing:
                touched.append(Row(old.id, old.path, size, mtime, digest, "ok"))
                report.unchanged += 1
                continue
            if old is None:
                row_id, next_id = next_id, next_id + 1
            else:
                row_id = old.id
            todo.append((path, Row(row_id, str(path), size, mtime, digest, "ok")))
        if touched:
            index.commit(touched, [])
        is_new = {row.id for _, row in todo if str(row.path) not in rows}

        batch_size = batch_size or blip2.batch_size
        show = progress if progress is not None else len(todo) > 4 * batch_size
        pending: list[Row] = []
        interval, last_commit = commit_every, time.perf_counter()
        embed_start, embedded = time.perf_counter(), 0
        by_path = {str(p): row for p, row in todo}

        def flush(batch: list[Embedded]) -> None:
            nonlocal embedded
            ok = [(feats, by_path[str(path)]) for path, feats, _ in batch if feats is not None]
            for path, feats, error in batch:
                row = by_path[str(path)]
                if feats is None:
                    row.status, row.error = "error", error
                    report.failed.append((row.path, error))
                pending.append(row)
            old_ids = [rows[str(p)].id for p, _, _ in batch
                       if str(p) in rows and rows[str(p)].status == "ok" and rows[str(p)].id not in index.missing]
            index.vectors = vec.remove(index.vectors, old_ids, q)  # a changed image: its new vectors replace these
            if ok:
                vec.add(index.vectors, np.array([row.id for _, row in ok]), np.stack([f for f, _ in ok]))
                embedded += len(ok)

        if embed is None:
            def embed(files: list[Path]) -> Iterable[list[Embedded]]:
                return embed_files(blip2, files, batch_size, workers)

        with tqdm(total=len(todo), desc="indexing", unit="img", disable=not show, leave=False) as bar:
            done = 0
            for batch in embed([p for p, _ in todo]) if todo else ():
                flush(batch)
                done += len(batch)
                bar.update(len(batch))
                if time.perf_counter() - last_commit >= interval:
                    t0 = time.perf_counter()
                    index.commit(pending, [])
                    pending = []
                    last_commit = time.perf_counter()
                    interval = max(commit_every, 10 * (last_commit - t0)) if commit_every > 0 else 0.0
                if on_batch is not None:
                    on_batch(done)
        if pending or index.repaired or kind_changed:  # a no-op refresh leaves the files as they were
            index.commit(pending, [])
        report.added = sum(1 for _, row in todo if row.id in is_new and row.status == "ok")
        report.updated = sum(1 for _, row in todo if row.id not in is_new and row.status == "ok")
        report.images = len(index)
        report.structure = index.structure
        report.seconds = time.perf_counter() - start
        elapsed = time.perf_counter() - embed_start
        report.embedded_per_s = embedded / elapsed if embedded and elapsed > 0 else 0.0
        return report
    finally:
        index.close()
