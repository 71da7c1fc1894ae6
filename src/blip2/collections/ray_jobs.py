"""Bulk labeling and indexing on a Ray cluster (DESIGN §4 "Beyond one machine"): Ray Data pipelines whose
model stage is an actor pool, one model per actor (one GPU per actor where the cluster has GPUs).

    paths (driver) ─► from_items ─► map_batches(actor: decode + model) ─► iter_batches (driver) ─► writer
                                        × num_actors, each loads the model once

The driver never runs the model for labeling; it reads the manifest first (what is done is not sent), and
writes what comes back exactly as `label_images` does: whole JSONL lines appended and fsynced per batch, parquet
written atomically from its journal at the end. A kill loses at most the batches in flight and the next run
resumes. Indexing keeps the faiss index and its SQLite table single-writer on the driver: `update_index` runs
there as on one machine (it loads the model too, for its fingerprint), with the actors' vectors as its source.
Rows and vectors equal the single-machine run's for the same images and settings (tests/collections/test_ray.py).

Ray is imported inside the functions only: the single-machine paths never import this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from blip2.collections.label import (
    MODES,
    LabelReport,
    _combine,
    _fail,
    already_done,
    append_journal,
    store_labels,
)

RAY_MISSING = "--engine ray needs Ray: pip install 'blip2[ray]'"


# ------------------------------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Ray, initialised: the running session if there is one, else `address` (None: $RAY_ADDRESS, else a local
    instance started here and shut down afterwards)."""
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def actor_resources(ray, num_actors: int | None, num_gpus: float | None, num_cpus: float | None) -> tuple[int, float, float]:
    """(actors, GPUs each, CPUs each): by default one actor per GPU of the cluster, else one per 2 CPUs; CPUs
    fractional where the actors would otherwise take every CPU (Ray Data's reading tasks need one, or starve)."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if num_gpus is None:
        num_gpus = 1.0 if gpus else 0.0
    if num_actors is None:
        num_actors = max(1, int(gpus / num_gpus)) if num_gpus > 0 else max(1, int(cpus // 2))
    if num_cpus is None:
        num_cpus = min(1.0, max(0.1, (cpus - 1) / num_actors))
    return num_actors, float(num_gpus), float(num_cpus)


def load_on_worker(model: str, load_kwargs: dict[str, Any]):
    """In an actor: the model, on the actor's GPU when it holds one ("auto" device/dtype as the CLI's)."""
    import torch

    from blip2.inference.pipeline import load

    kw = dict(load_kwargs)
    if kw.get("device") in (None, "auto"):
        kw["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if kw.get("dtype") in (None, "auto"):
        cuda = str(kw["device"]).startswith("cuda")
        kw["dtype"] = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32"
    return load(model, **kw)


def _pipeline(ray, paths: Sequence[Path], actor: type, kwargs: dict[str, Any], batch_size: int,
              resources: tuple[int, float, float]):
    """paths -> map_batches(actor) over a pool; the driver iterates the output batches as they finish (and
    shows its own progress bar: Ray Data's per-stage bars are off)."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet = logging.getLogger("ray.data")  # its per-run INFO lines ("execution finished in ...") are noise here
    quiet.setLevel(max(logging.WARNING, quiet.getEffectiveLevel()))
    actors, gpus, cpus = resources
    ds = ray.data.from_items([{"path": str(p)} for p in paths])
    return ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus)


# ------------------------------------------------------------------------------------------- labeling


class LabelActor:
    """A Ray Data actor: loads the model once, then turns batches of paths into manifest rows (as JSON text;
    `label` is the bare generated text: the driver adds prefix/suffix and combines with existing labels)."""

    def __init__(self, model: str, load_kwargs: dict[str, Any], question: str | None, prompt: str | None,
                 template: str | None, generation: dict[str, Any], model_name: str | None) -> None:
        from blip2.collections.label import label_settings

        self.blip2 = load_on_worker(model, load_kwargs)
        self.blip2._need_llm()
        # As label_images: the same settings, prompt and recorded fields.
        self.gen, self.llm_prompt, self.base = label_settings(
            self.blip2, question, prompt, template, generation, model_name
        )
        self.question = question

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from blip2.collections.label import _generate
        from blip2.collections.reader import decode_stream

        decoded = list(decode_stream([Path(p) for p in batch["path"]], self.blip2.model.config.vision.image, workers=0))
        ok = [d for d in decoded if d.pixels is not None]
        texts = iter(_generate(self.blip2, [d.pixels for d in ok], self.llm_prompt, self.question, self.gen) if ok else ())
        rows = []
        for d in decoded:
            if d.pixels is None:
                rows.append({"path": str(d.path), **self.base, "label": None, "status": "error", "error": d.error})
            else:
                rows.append({"path": str(d.path), **self.base, "label": next(texts), "status": "ok", "error": None})
        return {"row": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object)}


def label_with_ray(
    model: str,
    paths: Sequence[str | Path],
    *,
    out: str | Path,
    question: str | None = None,
    prompt: str | None = None,
    template: str | None = None,
    mode: str = "skip",
    prefix: str = "",
    suffix: str = "",
    separator: str = " ",
    retry_failed: bool = False,
    generation: dict[str, Any] | None = None,
    batch_size: int = 8,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    ray_address: str | None = None,
    load_kwargs: dict[str, Any] | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> LabelReport:
    """`label_images` on a Ray cluster, into a manifest (`out`: .jsonl, .csv or .parquet; sidecars would be
    written by many machines, so they are refused). `model`: what each actor passes to `blip2.load`, with
    `load_kwargs` (device, dtype, batch_size; device None: the actor's GPU if it holds one). The other options
    are `label_images`'. num_actors / num_gpus_per_actor / cpus_per_actor: `actor_resources`' defaults.
    ray_address: a running cluster (None: $RAY_ADDRESS, else a local instance for this run).
    Every path of `out` must be readable by every actor (a shared file system)."""
    from blip2.collections.writers import ManifestWriter
    from blip2.inference.generation import check_generation

    if out is None:
        raise ValueError("--engine ray writes one manifest: give --out labels.jsonl|.csv|.parquet")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if question is not None and prompt is not None:
        raise ValueError("give a question or a caption prompt, not both")
    generation = {k: v for k, v in (generation or {}).items() if v is not None}
    check_generation(generation)  # a typo fails here; the actors check the prompt's length against the model
    writer = ManifestWriter(Path(out))

    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    report = LabelReport(total=len(paths), output=writer.describe())
    writer.prepare(paths)
    # append/prepend: what a killed run of this command already stored is not added twice (label_images' journal)
    journal = append_journal(writer, paths, mode, [question, prompt, template, generation, model, model_name,
                                                   separator, prefix, suffix])
    todo = [p for p in paths if not already_done(writer, p, mode, journal, retry_failed)]
    report.skipped = len(paths) - len(todo)
    if todo:
        with ray_session(ray_address) as ray:
            resources = actor_resources(ray, num_actors, num_gpus_per_actor, cpus_per_actor)
            kwargs = {"model": model, "load_kwargs": dict(load_kwargs or {}), "question": question, "prompt": prompt,
                      "template": template, "generation": generation, "model_name": model_name}
            ds = _pipeline(ray, todo, LabelActor, kwargs, batch_size, resources)
            bar = tqdm(total=len(todo), desc="labeling (ray)", unit="img", disable=not progress, smoothing=0.1)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [json.loads(text) for text in batch["row"]]
                for row in rows:
                    if row["status"] == "ok":
                        new = f"{prefix}{row['label']}{suffix}"
                        row["label"] = _combine(mode, writer.existing(Path(row["path"])), new, separator)
                store_labels(writer, journal, rows)  # whole lines, fsynced: a kill loses only batches in flight
                for row in rows:
                    if row["status"] == "ok":
                        report.labeled += 1
                    else:
                        _fail(report, Path(row["path"]), row["error"])
                bar.update(len(rows))
            bar.close()
    writer.finish()
    if journal is not None:
        journal.remove()
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------------- indexing


class EmbedActor:
    """A Ray Data actor: loads the model once, then turns batches of paths into ITC vectors (Q, E) float32,
    flattened, or the file's error."""

    def __init__(self, model: str, load_kwargs: dict[str, Any]) -> None:
        self.blip2 = load_on_worker(model, load_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from blip2.collections.index import embed_decoded
        from blip2.collections.reader import decode_stream

        decoded = list(decode_stream([Path(p) for p in batch["path"]], self.blip2.model.config.vision.image, workers=0))
        out = embed_decoded(self.blip2, decoded)
        return {"path": np.array([str(p) for p, _, _ in out], dtype=object),
                "vectors": np.array([b"" if v is None else np.ascontiguousarray(v, np.float32).tobytes()
                                     for _, v, _ in out], dtype=object),
                "error": np.array([e or "" for _, _, e in out], dtype=object)}


def index_with_ray(
    blip2,
    model: str,
    folder: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    batch_size: int = 8,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    ray_address: str | None = None,
    load_kwargs: dict[str, Any] | None = None,
    progress: bool | None = None,
    **update_kwargs: Any,
):
    """`update_index(blip2, folder, inputs, **update_kwargs)` with the images embedded by Ray actors (each loads
    `model` with `load_kwargs`). `blip2`: the same model loaded here, for the index's fingerprint and sizes (the
    CPU is enough: it embeds nothing). The index is written here only, as on one machine; resumable alike."""
    from blip2.collections.index import update_index

    q, dim = blip2.model.num_queries, blip2.model.config.image_text_hidden_size
    kwargs = {"model": model, "load_kwargs": dict(load_kwargs or {})}

    def embed(files: list[Path]):
        with ray_session(ray_address) as ray:
            resources = actor_resources(ray, num_actors, num_gpus_per_actor, cpus_per_actor)
            ds = _pipeline(ray, files, EmbedActor, kwargs, batch_size, resources)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield [(Path(p), np.frombuffer(v, np.float32).reshape(q, dim) if v else None, e or None)
                       for p, v, e in zip(batch["path"], batch["vectors"], batch["error"])]

    return update_index(blip2, folder, inputs, batch_size=batch_size, progress=progress, embed=embed, **update_kwargs)
