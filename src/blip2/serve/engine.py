"""The model worker: one thread owns the model and runs every forward pass; request handlers (asyncio)
hand it jobs and await futures.

Batching (DESIGN §4 "Serving"): generation jobs that arrive within `max_wait_s` of each other and share
their decoding settings run as one batch (up to `max_batch_size`): their images go through the vision
tower together (cache misses only), then the Q-Former and the LLM's `generate` as one batch. A job's
tokens do not depend on its batch mates: prompts are left-padded with an attention mask, exactly as
`Blip2.caption`/`ask` batch a list (tested: every answer equals the same request sent alone). Sampling
with a `seed` runs alone, so the seed alone decides its tokens.

Jobs that arrive while a batch is decoding wait for the next one (dynamic batching, not vLLM's
continuous batching: transformers' `generate` cannot admit rows mid-loop).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from blip2.data.text import tokenize_prompts
from blip2.inference.pipeline import Blip2
from blip2.serve.cache import FeatureCache
from blip2.serve.metrics import Metrics

log = logging.getLogger("blip2.serve")


class QueueFull(Exception):
    """The worker's queue is at its bound: the client should retry later (503)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (503)."""


@dataclass
class ImageRef:
    """One request image: its content hash, the decoded image, and (unless it was cached when the request came
    in) its pixels, preprocessed in the handler's thread so the worker does not wait on it."""

    sha256: str
    pixels: torch.Tensor | None  # (1, 3, S, S) on the CPU
    image: Any = None  # the decoded PIL image: pixels again if the cache evicts the features meanwhile


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


class _Job:
    """Something for the worker, with the way back to the event loop that waits for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()

    def resolve(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, None, error)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the handler gave up (time limit, disconnect)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class GenerationJob(_Job):
    def __init__(self, loop, image: ImageRef, prompt: str, question: str | None, settings: dict[str, Any],
                 stop: Sequence[str] = (), stream: bool = False):
        super().__init__(loop)
        self.image, self.prompt, self.question = image, prompt, question
        self.settings, self.stop = settings, tuple(stop)
        # Streamed text goes through an asyncio queue: ("delta", str) items, then ("end", Result | error).
        self.stream: asyncio.Queue | None = asyncio.Queue() if stream else None
        seed = settings.get("seed") if settings.get("do_sample") else None
        # Settings decide the batch; a seeded sampler gets a batch of its own (its id makes the key unique).
        self.key = (tuple(sorted((k, v) for k, v in settings.items() if k != "seed")), seed, id(self) if seed is not None else 0)

    def emit(self, text: str) -> None:
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, ("delta", text))

    def resolve(self, value: Any) -> None:
        super().resolve(value)
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, ("end", value))

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, ("end", error))


class CallJob(_Job):
    """Any other model work (matching, retrieval, embeddings): `fn(engine)` runs on the worker, alone."""

    def __init__(self, loop, fn: Callable[["Engine"], Any]):
        super().__init__(loop)
        self.fn = fn


_STOP = object()


class Engine:
    def __init__(self, blip2: Blip2, *, max_batch_size: int = 16, max_wait_s: float = 0.01, max_queue: int = 256,
                 cache_bytes: int = 512 * 1024**2, metrics: Metrics | None = None):
        self.blip2 = blip2
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.cache = FeatureCache(cache_bytes)
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[_Job] = []  # taken off the queue, not yet run (worker thread only)
        self._depth = 0  # jobs submitted and not yet started
        self._depth_lock = threading.Lock()
        self._closing = False
        self.cancelled = 0  # jobs whose client left (or timed out) before they finished
        self._thread = threading.Thread(target=self._run, name="blip2-model-worker", daemon=True)
        self.metrics.gauge("blip2_queue_depth", "Jobs waiting for the model worker.", lambda: self._depth)
        self.metrics.gauge("blip2_image_cache_hits_total", "Image features served from the cache.", lambda: self.cache.hits)
        self.metrics.gauge("blip2_image_cache_misses_total", "Images that had to be encoded.", lambda: self.cache.misses)
        self.metrics.gauge("blip2_cancelled_total", "Jobs stopped early because their client left or timed out.",
                           lambda: self.cancelled)
        self.metrics.gauge("blip2_image_cache_bytes", "Bytes of image features held.", lambda: self.cache.bytes)
        self.metrics.gauge("blip2_image_cache_images", "Images whose features are held.", lambda: len(self.cache))

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new work, let the batch in flight finish, fail what is still queued."""
        self._closing = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- what handlers call -------------------------------------------------------------------------------
    def image_ref(self, sha256: str, image) -> ImageRef:
        """Pixels only for images the cache does not hold (preprocessing runs in the handler's thread)."""
        if sha256 in self.cache:
            return ImageRef(sha256, None, image)
        return ImageRef(sha256, self.blip2.images([image]), image)

    def submit(self, job: _Job) -> _Job:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        with self._depth_lock:
            if self._depth >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} jobs waiting)")
            self._depth += 1
        self._queue.put(job)
        return job

    # -- the worker ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                self._pending.append(item)
            # Bounded wait for batch mates: everything already queued joins at once, newcomers up to max_wait.
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while True:
                try:
                    remaining = deadline - time.monotonic()
                    item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                self._pending.append(item)
            self._step()
            if stop:
                break
        for job in self._pending + self._drain():
            self._started(job)
            job.fail(ShuttingDown("the server shut down before this request ran"))

    def _drain(self) -> list[_Job]:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is not _STOP:
                out.append(item)

    def _started(self, job: _Job) -> None:
        with self._depth_lock:
            self._depth -= 1

    def _step(self) -> None:
        """Run the oldest job's batch: every pending job with its key, up to max_batch_size."""
        first = self._pending[0]
        if isinstance(first, CallJob):
            self._pending.pop(0)
            self._started(first)
            if first.cancelled.is_set():
                self.cancelled += 1
            else:
                self._call(first)
            return
        batch = [j for j in self._pending if isinstance(j, GenerationJob) and j.key == first.key][: self.max_batch_size]
        taken = set(map(id, batch))
        self._pending = [j for j in self._pending if id(j) not in taken]
        for job in batch:
            self._started(job)
        self.cancelled += sum(j.cancelled.is_set() for j in batch)
        batch = [j for j in batch if not j.cancelled.is_set()]
        if batch:
            self._generate(batch)

    def _call(self, job: CallJob) -> None:
        try:
            job.resolve(job.fn(self))
        except Exception as err:  # noqa: BLE001 - the handler turns it into a response
            job.fail(err)

    def features(self, images: Sequence[ImageRef]) -> torch.Tensor:
        """(B, N, Dv) for the images, the cache misses encoded in one batch (worker thread only)."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, torch.Tensor] = {}
        for ref in images:
            if ref.sha256 in found or ref.sha256 in missing:
                continue
            feats = self.cache.get(ref.sha256)
            if feats is not None:
                found[ref.sha256] = feats
            elif ref.pixels is not None:
                missing[ref.sha256] = ref.pixels
            else:  # evicted between the handler's look-up and now
                missing[ref.sha256] = self.blip2.images([ref.image])
        if missing:
            model = self.blip2.model
            dtype = next(model.vision_model.parameters()).dtype
            pixels = torch.cat(list(missing.values())).to(self.blip2.device, dtype)
            for start in range(0, pixels.shape[0], self.blip2.batch_size):
                chunk = model.encode_image(pixels[start : start + self.blip2.batch_size])
                for key, feats in zip(list(missing)[start : start + chunk.shape[0]], chunk.split(1)):
                    found[key] = feats
                    self.cache.put(key, feats)
        return torch.cat([found[ref.sha256] for ref in images])

    def _generate(self, batch: list[GenerationJob]) -> None:
        self.metrics.batch(len(batch))
        try:
            results = self._generate_batch(batch)
        except Exception as err:  # noqa: BLE001 - every job of the batch gets the error
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.fail(err)
            return
        for job, result in zip(batch, results):
            job.resolve(result)

    def _generate_batch(self, batch: list[GenerationJob]) -> list[Result]:
        b = self.blip2
        settings = dict(batch[0].settings)
        seed = settings.pop("seed", None)
        feats = self.features([job.image for job in batch])
        questions = [job.question or "" for job in batch]
        soft = b.soft_prompts(feats, questions)  # (B, Q, H): the Q-Former runs once for the batch
        tokens = tokenize_prompts(b.tokenizer, [job.prompt for job in batch], left_pad=not b.is_encoder_decoder)
        prompt_counts = tokens.attention_mask.sum(1).tolist()
        beams = settings.get("num_beams", 1)
        tracker = _Tracker(b.tokenizer, batch, beams)
        kwargs: dict[str, Any] = dict(
            input_ids=tokens.input_ids.to(b.device), attention_mask=tokens.attention_mask.to(b.device),
            soft_prompt=soft, stopping_criteria=StoppingCriteriaList([tracker]), **settings,
        )
        if beams == 1:
            kwargs["streamer"] = tracker  # transformers streams greedy and sampled steps, not beams
        if b.tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", b.tokenizer.pad_token_id)
        if seed is not None:
            torch.manual_seed(seed)  # the worker owns the global RNG; a seeded job runs alone
        ids = b.model.generate(**kwargs)
        out = []
        eos = _eos_ids(b)
        limit = settings.get("max_new_tokens")
        for i, job in enumerate(batch):
            row = ids[i].tolist()
            n = next((k + 1 for k, t in enumerate(row) if t in eos), None)
            hit_eos = n is not None
            if n is None:  # rows finished by a stop string or a cancel are padded after their last token
                n = len(row)
                while n > 0 and row[n - 1] == b.tokenizer.pad_token_id:
                    n -= 1
            text = b.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            text, stopped = _cut_at_stop(text, job.stop)
            if job.cancelled.is_set():
                reason = "cancelled"
                self.cancelled += 1
            elif stopped or hit_eos or limit is None or n < limit:
                reason = "stop"
            else:
                reason = "length"
            tracker.flush(i, text)
            out.append(Result(text, reason, prompt_counts[i] + b.model.num_queries, n))
        return out


def _eos_ids(b: Blip2) -> set[int]:
    gen_cfg = getattr(b.model.language_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = b.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut].rstrip(), True) if cut >= 0 else (text, False)


class _Tracker(BaseStreamer, StoppingCriteria):
    """Per-row bookkeeping during one `generate`: streams each row's new text to its job (greedy/sampling),
    and finishes a row early when its job was cancelled or its text reached one of its stop strings."""

    def __init__(self, tokenizer, batch: list[GenerationJob], beams: int):
        self.tokenizer, self.batch, self.beams = tokenizer, batch, beams
        self.ids: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done = [False] * len(batch)

    # BaseStreamer: the first put is the prompt (2-D), then one token per row per step (1-D).
    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:
            return
        for i, token in enumerate(value.tolist()):
            if self.done[i]:
                continue
            self.ids[i].append(token)
            job = self.batch[i]
            if job.stream is None:
                continue
            text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True).strip()
            text, stopped = _cut_at_stop(text, job.stop)
            # Hold back a trailing partial character (a byte-level token split) and a possible stop prefix.
            if text.endswith("\ufffd"):
                continue
            safe = text if stopped else text[: len(text) - _stop_prefix_len(text, job.stop)]
            if safe.startswith(self.sent[i]) and len(safe) > len(self.sent[i]):
                job.emit(safe[len(self.sent[i]):])
                self.sent[i] = safe
            if stopped:
                self.done[i] = True

    def end(self) -> None:
        pass

    def flush(self, i: int, final: str) -> None:
        """After generate: send whatever the stream has not shown yet of the final text."""
        job = self.batch[i]
        if job.stream is not None and final.startswith(self.sent[i]) and len(final) > len(self.sent[i]):
            job.emit(final[len(self.sent[i]):])
            self.sent[i] = final

    # StoppingCriteria: (rows,) bool, True where a row may stop. Rows are batch * beams under beam search.
    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = input_ids.shape[0]
        flags = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        for i, job in enumerate(self.batch):
            stop = job.cancelled.is_set()
            if not stop and job.stop and self.beams == 1:
                text = self.tokenizer.decode(input_ids[i].tolist(), skip_special_tokens=True)
                stop = any(s and s in text for s in job.stop)
            if stop:
                flags[i * self.beams : (i + 1) * self.beams] = True
        return flags


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string (held back while streaming)."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
