"""Folders in, pixels out: find the image files of a collection and decode them in worker processes.

`find_images` lists the files a bulk job works on (sorted, deduplicated). `decode_stream` yields one `Decoded`
per path, in input order, with the model's own eval preprocessing (`blip2.data.images`, so pixels equal what
`Blip2.caption` computes) or the one-line reason the file cannot be used. Decoding runs in a process pool ahead
of the consumer, a bounded number of chunks in flight, so the model never waits on JPEG decoding and memory
stays bounded; a bad file, even one that crashes its worker, becomes that file's error and the stream goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from blip2.data.images import ImageError, ImageSettings, eval_resize, load_image, normalize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CRASHED = "the decoder crashed on this file (its worker process died)"


# ------------------------------------------------------------------------------------------- finding


def find_images(
    inputs: Sequence[str | Path],
    recursive: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    files_from: str | Path | None = None,
) -> list[Path]:
    """Image files of `inputs` (files and folders) and of `files_from` (a text file, one path per line), sorted
    and deduplicated.

    Folders contribute their files whose suffix is in `extensions` (any case), their sub-folders too with
    `recursive`; files named directly are kept whatever their suffix. An input that does not exist is a
    FileNotFoundError; a path listed in `files_from` that does not exist is kept, so the job records it as an
    error instead of stopping (lists go stale). Relative paths in the list are relative to the current
    directory, as with `tar --files-from`; blank lines and lines starting with '#' are skipped.
    """
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found: dict[str, Path] = {}

    def add(path: Path) -> None:
        path = Path(os.path.normpath(path))
        found.setdefault(os.path.abspath(path), path)  # the same file named twice is labeled once

    def expand(item: Path, missing_ok: bool, where: str) -> None:
        if item.is_dir():
            walk = item.rglob("*") if recursive else item.iterdir()
            for f in walk:
                if f.suffix.lower() in exts and f.is_file():
                    add(f)
        elif item.exists() or missing_ok:
            add(item)
        else:
            raise FileNotFoundError(f"{where}{item} does not exist (give image files or folders of images)")

    for item in inputs:
        expand(Path(item), missing_ok=False, where="")
    if files_from is not None:
        listing = Path(files_from)
        if not listing.is_file():
            raise FileNotFoundError(f"--files-from list {listing} does not exist (a text file, one path a line)")
        for line in listing.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                expand(Path(line), missing_ok=True, where=f"{listing}: ")
    return sorted(found.values(), key=lambda p: str(p))


# ------------------------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    """One file of the stream: its pixels (3, S, S) float32, or the one-line reason it has none."""

    path: Path
    pixels: torch.Tensor | None
    error: str | None


def describe_error(path: Path, err: BaseException) -> str:
    """The one-line reason an image file cannot be used: 'empty file', 'not an image', 'truncated image
    file', 'decompression bomb (N pixels, limit M)', 'file does not exist', ..."""
    cause = err.__cause__ if isinstance(err, ImageError) and err.__cause__ is not None else err
    text = " ".join(str(cause).split())
    if isinstance(cause, Image.DecompressionBombError):
        sizes = re.findall(r"\d+", text)
        if len(sizes) >= 2:
            return f"decompression bomb ({sizes[0]} pixels, limit {sizes[1]})"
        return f"decompression bomb ({text})"
    if isinstance(cause, UnidentifiedImageError):
        return "not an image (no image format recognises it)"
    if isinstance(cause, (EOFError, SyntaxError)) or "truncat" in text.lower() or "broken data stream" in text:
        return f"truncated image file ({type(cause).__name__}: {text})"
    if isinstance(cause, ImageError) and "does not exist" in text:
        return "file does not exist"
    if isinstance(cause, PermissionError):
        return "permission denied"
    if isinstance(cause, MemoryError):
        return "out of memory decoding it"
    return f"unreadable image ({type(cause).__name__}: {text})"


def _decode_file(path: Path, cfg: ImageSettings) -> tuple[np.ndarray | None, str | None]:
    """One file -> its resized RGB image as uint8 (S, S, 3), or its error. Runs in a worker: PIL and numpy only
    (uint8 crosses the process boundary at a quarter of float32's size; the parent normalises)."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            return None, "empty file"
        return np.asarray(eval_resize(load_image(path), cfg), dtype=np.uint8), None
    except Exception as err:  # noqa: BLE001 - any failure is this file's error, never the job's
        return None, describe_error(path, err)


def _decode_chunk(paths: Sequence[Path], cfg: ImageSettings) -> list[tuple[np.ndarray | None, str | None]]:
    """The worker's task (top level, so it pickles under spawn too)."""
    return [_decode_file(p, cfg) for p in paths]


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: a worker whose parent was killed (kill -9 leaves no time to shut the pool down)
    exits instead of waiting forever for tasks; a daemon thread checks twice a second."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _context() -> multiprocessing.context.BaseContext:
    # fork on Linux, as torch's DataLoader: no re-import of torch per worker (seconds on a busy machine).
    # Workers use PIL and numpy only. Elsewhere spawn, which the top-level task function allows.
    methods = multiprocessing.get_all_start_methods()
    fork = sys.platform.startswith("linux") and "fork" in methods
    return multiprocessing.get_context("fork" if fork else "spawn")


def _to_decoded(path: Path, result: tuple[np.ndarray | None, str | None], cfg: ImageSettings) -> Decoded:
    array, error = result
    if array is None:
        return Decoded(path, None, error)
    return Decoded(path, normalize([array], cfg)[0], None)  # (3, S, S)


def decode_stream(
    paths: Sequence[Path], image_config: ImageSettings, workers: int | None = None, chunk: int = 16
) -> Iterator[Decoded]:
    """A `Decoded` per path, in input order: load (EXIF orientation applied), RGB, the eval resize of
    `image_config` and normalisation, exactly as `blip2.data.images.ImageProcessor` does.

    `workers` processes decode `chunk` files per task, at most 2 tasks per worker in flight ahead of the
    consumer (memory stays bounded); `workers=0` decodes in this process; None: min(4, CPUs). A file whose
    worker dies (a crash in a decoder library) gets that as its error; the pool is rebuilt and the rest go on.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers <= 0:
        for path in paths:
            yield _to_decoded(path, _decode_file(path, image_config), image_config)
        return
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), max(1, chunk))]
    pool = _Pool(workers, image_config)
    try:
        pending: deque[tuple[list[Path], tuple[ProcessPoolExecutor, Future]]] = deque()
        upcoming = iter(chunks)
        for part in upcoming:
            pending.append((part, pool.submit(part)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            part, task = pending.popleft()
            for path, result in zip(part, pool.results(part, task)):
                yield _to_decoded(path, result, image_config)
            part = next(upcoming, None)
            if part is not None:
                pending.append((part, pool.submit(part)))
    finally:
        pool.close()


class _Pool:
    """A process pool that survives a worker crash: the files of every task lost with it are decoded again one by
    one in a fresh pool, so the crash is charged to the file that causes it, not to its neighbours."""

    def __init__(self, workers: int, cfg: ImageSettings) -> None:
        self.workers, self.cfg = workers, cfg
        self.executor = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_exit_with_parent,
                                   initargs=(os.getpid(),))

    def submit(self, part: list[Path]) -> tuple[ProcessPoolExecutor, Future]:
        try:
            return self.executor, self.executor.submit(_decode_chunk, part, self.cfg)
        except BrokenProcessPool:  # broken by a task still pending: its results() call rebuilds the pool
            future: Future = Future()
            future.set_exception(BrokenProcessPool())
            return self.executor, future

    def results(self, part: list[Path], task: tuple[ProcessPoolExecutor, Future]) -> list:
        executor, future = task
        try:
            return future.result()
        except BrokenProcessPool:
            if executor is self.executor:  # tasks of an older, already replaced pool need no new one
                self._rebuild()
            out = []
            for path in part:
                try:
                    out += self.executor.submit(_decode_chunk, [path], self.cfg).result()
                except BrokenProcessPool:
                    out.append((None, CRASHED))
                    self._rebuild()
            return out

    def _rebuild(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._new()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
