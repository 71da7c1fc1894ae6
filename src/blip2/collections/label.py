"""Label a collection: a caption (or an answer to one question) for every image, into sidecars or a manifest.

`label_images` is what `blip2 label` runs. Images are decoded in worker processes ahead of the model
(`reader.decode_stream`), generated in batches through the same calls as `Blip2.caption` / `Blip2.ask`, and each
batch is written before the next starts (`writers`): a kill loses at most the batch in flight, and the next run
skips what is done. A bad file is recorded with its one-line error and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blip2.collections.reader import IMAGE_EXTENSIONS, Decoded, decode_stream
from blip2.collections.writers import AppendJournal, ManifestWriter, SidecarWriter
from blip2.inference.pipeline import CAPTION_DEFAULTS, VQA_DEFAULTS, Blip2

MODES = ("skip", "overwrite", "append", "prepend")
log = logging.getLogger(__name__)


@dataclass
class LabelReport:
    """What a run did. `failures`: (path, error) of every file recorded as an error this run."""

    total: int
    labeled: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    output: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.labeled} labeled, {self.skipped} skipped (already done), {self.failed} failed, {self.total} "
                f"in all; {self.seconds:.1f} s, {self.images_per_second:.2f} images/s -> {self.output}")


def check_ext(ext: str) -> str:
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext.lower() in IMAGE_EXTENSIONS or ext in (".", "") or "/" in ext or "\\" in ext:
        raise ValueError(f"--ext {ext!r} cannot name a label file (it would replace images or leave the folder)")
    return ext


def _combine(mode: str, old: str | None, new: str, separator: str) -> str:
    if not old or mode in ("skip", "overwrite"):
        return new
    old = old.rstrip("\r\n")
    return f"{old}{separator}{new}" if mode == "append" else f"{new}{separator}{old}"


def label_settings(model: Blip2, question: str | None, prompt: str | None, template: str | None,
                   generation: dict[str, Any] | None, model_name: str | None) -> tuple[dict, str, dict]:
    """(generation settings, LLM prompt, the manifest fields every row shares), checked against the model
    (settings, prompt length). One place for `label_images` and the Ray actors, so both label alike."""
    if question is not None:
        gen = model._generation(VQA_DEFAULTS, generation or {})
        llm_prompt = (template or model.question_template).format(question)
    else:
        gen = model._generation(CAPTION_DEFAULTS, generation or {})
        llm_prompt = prompt or ""
    model.check_prompts([llm_prompt], gen["max_new_tokens"])
    recorded = {k: v for k, v in gen.items() if k != "pad_token_id"}
    base = {"task": "answer" if question is not None else "caption", "prompt": prompt, "question": question,
            "model": model_name, "generation": recorded}
    return gen, llm_prompt, base


def label_images(
    model: Blip2,
    paths: Sequence[str | Path],
    *,
    question: str | None = None,
    prompt: str | None = None,
    template: str | None = None,
    out: str | Path | None = None,
    ext: str = ".txt",
    mode: str = "skip",
    prefix: str = "",
    suffix: str = "",
    separator: str = " ",
    retry_failed: bool = False,
    generation: dict[str, Any] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> LabelReport:
    """Caption every image of `paths` (with `prompt`, the caption continues it), or answer `question` about each
    (`template`: the LLM family's "Question: {} Answer:" by default), and write the labels.

    out: None writes a sidecar `<stem><ext>` next to each image; a `.jsonl`, `.csv` or `.parquet` path writes
    one manifest (path, task, prompt, question, label, model, generation, status, error).
    mode: "skip" (default) leaves images already labeled alone, so a rerun resumes a killed run; "overwrite"
    labels every image again; "append" / "prepend" add the new label after / before the existing text
    (joined by `separator`); their rerun after a kill does not add the label twice (an `AppendJournal`,
    deleted when the run finishes: running the same command again later appends again). `prefix` and `suffix` wrap every new label. Failed images are recorded once
    (manifest row with status "error") and skipped by later runs unless `retry_failed`; sidecar runs keep no
    record of failures, so they are tried again by every run (a decode costs little).
    generation: settings as for `Blip2.caption` / `Blip2.ask` (None values are unset); checked, with the prompt,
    before any image is read. batch_size: images per forward pass (default: the model's). workers: decoding
    processes (None: min(4, CPUs); 0: in this process).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if question is not None and prompt is not None:
        raise ValueError("give a question or a caption prompt, not both")
    model._need_llm()
    writer: SidecarWriter | ManifestWriter
    writer = ManifestWriter(Path(out)) if out is not None else SidecarWriter(check_ext(ext))
    batch_size = batch_size or model.batch_size

    # Settings and prompt are checked before any image is read: a mistake costs nothing.
    gen, llm_prompt, base = label_settings(model, question, prompt, template, generation, model_name)

    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    report = LabelReport(total=len(paths), output=writer.describe())
    writer.prepare(paths)
    journal = append_journal(writer, paths, mode, [llm_prompt, separator, prefix, suffix, base])
    todo, seen = [], {}
    for path in paths:
        if isinstance(writer, SidecarWriter):
            # photo.jpg and photo.png would share photo.txt: the first one keeps it, the others are errors.
            other = seen.setdefault(writer.sidecar(path), path)
            if other != path:
                name = writer.sidecar(path).name
                _fail(report, path, f"its sidecar {name} is {other.name}'s; use --out for these")
                continue
        if already_done(writer, path, mode, journal, retry_failed):
            report.skipped += 1
        else:
            todo.append(path)

    def run_batch(window: list[Decoded]) -> None:
        ok = [d for d in window if d.pixels is not None]
        texts = _generate(model, [d.pixels for d in ok], llm_prompt, question, gen) if ok else []
        labels = iter(texts)
        rows = []
        for d in window:
            if d.pixels is None:
                rows.append({"path": str(d.path), **base, "label": None, "status": "error", "error": d.error})
                continue
            text = _combine(mode, writer.existing(d.path), f"{prefix}{next(labels)}{suffix}", separator)
            rows.append({"path": str(d.path), **base, "label": text, "status": "ok", "error": None})
        failed = {id(row): error for row, error in store_labels(writer, journal, rows)}
        for row in rows:
            if row["status"] == "error":
                _fail(report, Path(row["path"]), row["error"])
            elif id(row) in failed:
                _fail(report, Path(row["path"]), failed[id(row)])
            else:
                report.labeled += 1
        bar.update(len(window))
        bar.set_postfix(failed=report.failed, refresh=False)

    cfg = model.model.config.vision.image
    with tqdm(total=len(todo), desc="labeling", unit="img", disable=not progress or not todo, smoothing=0.1) as bar:
        window: list[Decoded] = []
        ready = 0
        for decoded in decode_stream(todo, cfg, workers=workers, chunk=max(1, min(16, batch_size))):
            window.append(decoded)
            ready += decoded.pixels is not None
            if ready >= batch_size:
                run_batch(window)
                window, ready = [], 0
        if window:
            run_batch(window)
    writer.finish()
    if journal is not None:
        journal.remove()
    report.seconds = time.perf_counter() - start
    return report


def already_done(writer: SidecarWriter | ManifestWriter, path: Path, mode: str, journal: AppendJournal | None,
                 retry_failed: bool) -> bool:
    """Whether this run leaves `path` alone: labeled before (mode "skip"), or its label already stored by a
    killed run of the same append/prepend command (the journal)."""
    done = writer.done(path) if isinstance(writer, SidecarWriter) else writer.done(path, retry_failed)
    return (mode == "skip" and done) or (journal is not None and journal.done(path, writer.existing(path)))


def store_labels(writer: SidecarWriter | ManifestWriter, journal: AppendJournal | None,
                 rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """Write `rows`, the journal first: a kill in between leaves the old labels, which a rerun labels again.
    Returns the writer's (row, error) failures."""
    if journal is not None:
        journal.record([(Path(r["path"]), writer.stored(r["label"])) for r in rows if r["status"] == "ok"])
    return writer.write(rows)


def append_journal(writer: SidecarWriter | ManifestWriter, paths: Sequence[Path], mode: str,
                   settings: list[Any]) -> AppendJournal | None:
    """The append/prepend journal of this run: beside the manifest, or in the images' common folder for
    sidecars; named by a hash of `settings` (everything that decides the labels) with the mode and the
    target, so only the same command resumes."""
    if mode not in ("append", "prepend") or not paths:
        return None
    if isinstance(writer, ManifestWriter):
        folder, target = writer.out.parent, os.path.abspath(writer.out)
    else:
        folder = Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths]))
        target = writer.ext
    key = [mode, target, *settings]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    journal = AppendJournal(folder / f".blip2-label-{mode}-{digest}.journal.jsonl")
    journal.load()
    return journal


def _fail(report: LabelReport, path: Path, error: str) -> None:
    report.failed += 1
    report.failures.append((str(path), error))
    with tqdm.external_write_mode():  # above the progress bar, not through it
        log.warning("%s: %s", path, error)


@torch.no_grad()
def _generate(model: Blip2, pixels: list[torch.Tensor], llm_prompt: str, question: str | None,
              gen: dict[str, Any]) -> list[str]:
    """Labels of one batch of decoded images: the same steps as `Blip2.caption` / `Blip2.ask` after their
    image processor (encode, Q-Former, soft prompt, the LLM's generate)."""
    dtype = next(model.model.vision_model.parameters()).dtype
    batch = torch.stack(pixels).to(model.device, dtype)  # (B, 3, S, S)
    feats = model.model.encode_image(batch)  # (B, N, Dv)
    # The Q-Former of a question_to_qformer model reads the question, or the caption prompt (Blip2.caption).
    questions = [question if question is not None else llm_prompt] * len(pixels)
    soft = model.soft_prompts(feats, questions)  # (B, Q, H)
    return model._generate(soft, [llm_prompt] * len(pixels), gen)
