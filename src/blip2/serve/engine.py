"""The model worker: one thread owns the model and runs every forward pass; request handlers (asyncio)
hand it jobs and await futures.

Two ways to batch (DESIGN §4 "Serving"), both changing nothing but speed:
- Continuous batching (greedy and sampled requests to a decoder-only LLM): new requests join the running batch
  between decode steps and leave the step they finish, as in vLLM (`serve/continuous.py`). Requests that arrive
  together share one vision-tower, Q-Former and prefill pass, then decode in the shared batch; padding with masks
  and per-row positions keeps each request's tokens equal to `generate` on it alone (tested).
- Whole batches (beam search; encoder-decoder LLMs such as Flan-T5): jobs that arrive within `max_wait_s` of
  each other and share their decoding settings run as one `generate` batch of up to `max_batch_size`,
  left-padded with an attention mask exactly as `Blip2.caption`/`ask` batch a list. Sampling with a `seed`
  runs alone there, so the seed alone decides its tokens.
Calls (matching, retrieval, embeddings) run between decode steps. Every image's features come from the cache
when its content hash is there (`serve/cache.py`). Jobs about the same image (same content hash; e.g. the
questions of one /v1/ask request) batched together share its soft prompt: the Q-Former runs once per image and,
when the soft prompt does not read the question, the LLM prefills it once for all of them (and their beams),
in both ways of batching (`generate_shared`, `ContinuousDecoder` prefixes).
Across requests, the prefix cache (`serve/prefix_cache.py`) keeps the LLM's keys/values of a finished
continuous request ([soft prompt; prompt; answer]); a later request about the same image that is alone for its
image in its join looks up the longest cached prefix of its tokens and prefills only the rest (a chat client
resending its conversation each turn pays for the new turn only). Jobs about one image that join together keep
the shared prefill above (one pass for all, cheaper than one cached pass each); beam search gets the cache when
it runs alone (one job in its batch), from the cached rows copied to every beam, as `ChatSession` does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from blip2.data.text import tokenize_prompts
from blip2.inference.pipeline import Blip2
from blip2.models.language import kv_cache
from blip2.serve.cache import FeatureCache
from blip2.serve.continuous import ContinuousDecoder
from blip2.serve.metrics import Metrics
from blip2.serve.prefix_cache import PrefixCache

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
                 cache_bytes: int = 512 * 1024**2, metrics: Metrics | None = None, continuous: bool = True,
                 prefix_cache_bytes: int = 256 * 1024**2):
        self.blip2 = blip2
        # Greedy and sampled requests to a decoder-only LLM join the running batch between decode steps; beam
        # search and encoder-decoder LLMs run as whole `generate` batches (see the module docstring).
        self.decoder: ContinuousDecoder | None = None
        self._rows: dict[GenerationJob, _RowText] = {}  # jobs decoding in self.decoder
        if continuous and blip2.tokenizer is not None and hasattr(blip2.model, "language_model"):
            try:
                self.decoder = ContinuousDecoder(blip2.model.language_model, max_batch_size)
            except ValueError as err:  # T5, sliding-window caches: dynamic batching only
                log.info("continuous batching off: %s", err)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.cache = FeatureCache(cache_bytes)
        # Keys/values across requests: decoder-only LLMs whose cache may be kept, soft prompts that do not read
        # the question (one that does differs per question, so nothing would be shared). Others: None.
        self.prefix: PrefixCache | None = None
        config = getattr(blip2.model, "config", None)
        if (prefix_cache_bytes > 0 and blip2.tokenizer is not None and hasattr(blip2.model, "language_model")
                and not getattr(config, "question_to_qformer", False)
                and kv_cache.can_keep(blip2.model.language_model)):
            self.prefix = PrefixCache(prefix_cache_bytes)
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
        prefix = self.prefix
        for name, help_text, read in (
            ("hits_total", "Requests whose prefill started from cached keys/values.", lambda: prefix.hits),
            ("misses_total", "Requests that found no cached prefix.", lambda: prefix.misses),
            ("reused_tokens_total", "Positions (soft prompt included) served from the prefix cache instead of "
             "prefilled.", lambda: prefix.reused_tokens),
            ("evictions_total", "Prefix cache entries evicted for room.", lambda: prefix.evictions),
            ("bytes", "Bytes of keys/values held by the prefix cache.", lambda: prefix.bytes),
            ("entries", "Prefixes held by the prefix cache.", lambda: len(prefix)),
        ):
            self.metrics.gauge(f"blip2_prefix_cache_{name}", help_text, (lambda: 0) if prefix is None else read)

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
        stop = False
        while not stop:
            if not self._pending and not self._rows:
                item = self._queue.get()  # idle: sleep until work arrives
                if item is _STOP:
                    break
                self._pending.append(item)
                # Bounded wait for batch mates: their images, Q-Former passes and prefills are then shared.
                stop = self._collect(time.monotonic() + self.max_wait_s)
            else:
                stop = self._collect(None)  # rows are decoding: take what has arrived, never wait
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a bug must fail its requests, not kill the worker
                log.exception("model worker step failed")
                self._fail_rows(RuntimeError("internal error in the model worker"))
        error = ShuttingDown("the server shut down before this request finished")
        self._fail_rows(error)
        for job in self._pending + self._drain():
            self._started(job)
            job.fail(error)

    def _collect(self, deadline: float | None) -> bool:
        """Move queued jobs to pending, waiting for newcomers until `deadline` (None: no wait). True on stop."""
        while True:
            try:
                remaining = 0 if deadline is None else deadline - time.monotonic()
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            self._pending.append(item)

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

    def _continuous(self, job: _Job) -> bool:
        return self.decoder is not None and isinstance(job, GenerationJob) and job.settings.get("num_beams", 1) == 1

    def _step(self) -> None:
        """Calls first; new continuous jobs join the decoder while it has room (max_batch_size rows); the oldest
        whole-batch group runs; then one decode step for every running row."""
        calls = [j for j in self._pending if isinstance(j, CallJob)]
        room = self.max_batch_size - len(self._rows)
        joining = [j for j in self._pending if self._continuous(j)][: max(room, 0)]
        taken = set(map(id, calls + joining))
        self._pending = [j for j in self._pending if id(j) not in taken]
        for job in calls:
            self._started(job)
            if job.cancelled.is_set():
                self.cancelled += 1
            else:
                self._call(job)
        if joining:
            self._join(joining)
        whole = [j for j in self._pending if not self._continuous(j)]
        if whole:
            self._generate_group(whole)
        if self._rows:
            self._decode_step()

    def _generate_group(self, candidates: list[GenerationJob]) -> None:
        """The oldest candidate's batch: every candidate with its key, up to max_batch_size, via generate."""
        first = candidates[0]
        batch = [j for j in candidates if j.key == first.key][: self.max_batch_size]
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

    # -- continuous batching --------------------------------------------------------------------------------
    def _join(self, jobs: list[GenerationJob]) -> None:
        """Soft prompts of the new jobs in one vision + Q-Former pass, then each joins the decoder with its
        unpadded [soft prompt; prompt] embeddings (the decoder prefills it alone, as generate would)."""
        for job in jobs:
            self._started(job)
        self.cancelled += sum(j.cancelled.is_set() for j in jobs)
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        if not jobs:
            return
        b = self.blip2
        try:
            soft, rows, shared = self._soft_prompts(jobs)  # (U, Q, H), each job's row
            lm = b.model.lm
            per_image = Counter(job.image.sha256 for job in jobs)
            for job, row in zip(jobs, rows.tolist()):
                token_ids: list[int] = b.tokenizer(job.prompt)["input_ids"]
                ids = torch.tensor([token_ids], dtype=torch.long, device=b.device)  # (1, T)
                embeds = torch.cat([soft[row].to(lm.model.dtype), lm.embed(ids)[0]])  # (Q+T, H)
                settings = {k: v for k, v in job.settings.items()}
                if b.tokenizer.pad_token_id is not None:
                    settings.setdefault("pad_token_id", b.tokenizer.pad_token_id)
                # Jobs about one image admitted together prefill its soft prompt once (continuous.py).
                prefix = job.image.sha256 if shared else None
                past = keep = None
                if self.prefix is not None and shared:
                    soft_row = soft[row].clone()  # its own storage: an entry must not hold the whole batch's
                    if per_image[job.image.sha256] == 1:  # alone for its image: the cache beats a shared pass
                        hit = self.prefix.lookup(job.image.sha256, soft_row, token_ids)
                        past = hit[0] if hit is not None else None
                    keep = functools.partial(self._keep_prefix, job.image.sha256, soft_row, token_ids)
                self.decoder.add(job, embeds, settings, prefix=prefix, prefix_len=soft.shape[1], past=past, keep=keep)
                self._rows[job] = _RowText(b, job, ids.shape[1] + b.model.num_queries)
        except Exception as err:  # noqa: BLE001 - these jobs get the error, the running rows go on
            log.exception("admitting %d requests failed", len(jobs))
            for job in jobs:
                if job in self._rows:
                    self.decoder.cancel(job)
                    del self._rows[job]
                job.fail(err)
            return
        self.metrics.batch(len(jobs))

    def _keep_prefix(self, image: str, soft: torch.Tensor, ids: list[int], cache, generated: list[int]) -> None:
        """A finished continuous row's keys/values go to the prefix cache (the decoder calls this)."""
        try:
            self.prefix.put(image, soft, ids + generated, cache)
        except Exception:  # noqa: BLE001 - a cache that cannot keep something must not fail the request
            log.exception("prefix cache: keeping a finished request failed")

    def _decode_step(self) -> None:
        for job in [j for j in self._rows if j.cancelled.is_set()]:  # clients that left stop costing compute
            self.decoder.cancel(job)
            self.cancelled += 1
            self._rows.pop(job).finish("cancelled")
        for job, token, finished in self.decoder.step():
            row = self._rows.get(job)
            if row is None:
                continue
            stopped = row.push(token)
            if stopped:
                self.decoder.cancel(job)  # a stop string: the row leaves now
            if stopped or finished:
                del self._rows[job]
                row.finish("stop" if stopped else None)

    def _fail_rows(self, error: BaseException) -> None:
        for job in list(self._rows):
            if self.decoder is not None:
                self.decoder.cancel(job)
            job.fail(error)
        self._rows.clear()

    def _soft_prompts(self, jobs: Sequence[GenerationJob]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Soft prompts (U, Q, H), the row of each job (B,), and whether rows are shared. A soft prompt that
        does not read the question depends on the image alone: one per distinct image (content hash), which
        the LLM can then prefill once for all its jobs. Otherwise one per job."""
        b = self.blip2
        if b.model.config.question_to_qformer:
            soft = b.soft_prompts(self.features([job.image for job in jobs]), [job.question or "" for job in jobs])
            return soft, torch.arange(len(jobs)), False
        refs = {job.image.sha256: job.image for job in jobs}  # distinct images, in order
        order = list(refs)
        soft = b.soft_prompts(self.features(list(refs.values())))  # (U, Q, H): one Q-Former pass per image
        return soft, torch.tensor([order.index(job.image.sha256) for job in jobs]), True

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

    def _generate_cached(self, job: GenerationJob, soft: torch.Tensor, settings: dict[str, Any], seed: int | None,
                         expand: int, kwargs: dict[str, Any]) -> torch.Tensor:
        """One job of a whole batch (beam search; greedy with continuous batching off) from the prefix cache,
        as `ChatSession` runs a turn: the longest cached prefix of [soft; prompt], the prompt but its last token
        prefilled on one row, that row copied to each of the `expand` rows generate runs; generate prefills the
        last token. Afterwards the prompt's keys/values (identical in every beam's row) are kept, and with one
        row (greedy, sampling) the answer's too."""
        b = self.blip2
        lm = b.model.lm
        input_ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")  # (1, T), no padding
        token_ids = input_ids[0].tolist()
        soft_row = soft[0].clone()
        queries = soft_row.shape[0]
        hit = self.prefix.lookup(job.image.sha256, soft_row, token_ids)
        cache, held = (hit[0], hit[1] - queries) if hit is not None else (kv_cache.new_cache(lm.model), 0)
        first = lm.model.get_input_embeddings().weight.device  # a device-mapped LLM's first device
        if hit is None:
            kv_cache.prefill(lm.model, cache, soft_row[None].to(first, lm.model.dtype))
        if held < len(token_ids) - 1:
            kv_cache.prefill(lm.model, cache, lm.embed(input_ids[:, held:-1].to(first)))
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        _seed(seed)
        ids = lm.generate(soft_row[None], input_ids, mask, cache=cache, **kwargs)
        if expand > 1:
            kv_cache.crop(cache, queries + len(token_ids))  # the prompt: identical in every beam's row
            cache.batch_select_indices(torch.zeros(1, dtype=torch.long))  # CPU indices: any layer's device
        # What the cache holds: [soft; prompt; answer but its last token] with one row; the prompt with beams. A
        # compiled decode (fast_decode.py) decodes in a static copy and leaves this one at the prompt but its last.
        kept = (token_ids + ids[0].tolist())[: cache.get_seq_length() - queries]
        self._keep_prefix(job.image.sha256, soft_row, kept, cache, [])
        return ids

    # -- whole-batch generation (beam search, encoder-decoder LLMs) -------------------------------------------
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
        soft, rows, shared = self._soft_prompts(batch)  # the Q-Former runs once for the batch
        tokens = tokenize_prompts(b.tokenizer, [job.prompt for job in batch], left_pad=not b.is_encoder_decoder)
        prompt_counts = tokens.attention_mask.sum(1).tolist()
        beams = settings.get("num_beams", 1)
        tracker = _Tracker([_RowText(b, job, n + b.model.num_queries) for job, n in zip(batch, prompt_counts)], beams)
        kwargs: dict[str, Any] = dict(
            input_ids=tokens.input_ids.to(b.device), attention_mask=tokens.attention_mask.to(b.device),
            stopping_criteria=StoppingCriteriaList([tracker]), **settings,
        )
        if beams == 1:
            kwargs["streamer"] = tracker  # transformers streams greedy and sampled steps, not beams
        if b.tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", b.tokenizer.pad_token_id)
        expand = kv_cache.rows_per_sequence(b.model.lm.model, settings) if self.prefix is not None else None
        if len(batch) == 1 and shared and expand is not None and tokens.input_ids.shape[1] > 0:
            ids = self._generate_cached(batch[0], soft, settings, seed, expand, kwargs)
        elif shared and not b.is_encoder_decoder:
            # Each image's soft prompt is prefilled once, for all its jobs and beams (causal.py generate_shared).
            _seed(seed)
            ids = b.model.lm.generate_shared(soft, rows.to(b.device), kwargs.pop("input_ids"),
                                             kwargs.pop("attention_mask"), **kwargs)
        else:
            _seed(seed)
            ids = b.model.generate(soft_prompt=soft[rows.to(soft.device)], **kwargs)
        out = []
        for i, job in enumerate(batch):
            row = tracker.rows[i]
            if job.cancelled.is_set():
                self.cancelled += 1
            out.append(row.result(ids[i].tolist(), "cancelled" if job.cancelled.is_set() else None))
        return out


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)  # the worker owns the global RNG; a seeded job runs alone


def _eos_ids(b: Blip2) -> set[int]:
    gen_cfg = getattr(b.model.language_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = b.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut].rstrip(), True) if cut >= 0 else (text, False)


class _RowText:
    """One job's generated tokens as text: streams what is safe to show (never half a character, never the
    start of a possible stop string), notices its stop strings, and makes the final `Result`."""

    def __init__(self, blip2: Blip2, job: GenerationJob, prompt_tokens: int):
        self.tokenizer, self.job, self.prompt_tokens = blip2.tokenizer, job, prompt_tokens
        self.eos, self.pad = _eos_ids(blip2), blip2.tokenizer.pad_token_id
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add one token; True when the text has reached a stop string (the row should end)."""
        if self.stopped:
            return True
        self.ids.append(token)
        job = self.job
        if job.stream is None and not job.stop:
            return False  # nothing to stream or watch: decode once at the end
        text, self.stopped = _cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True).strip(), job.stop)
        if job.stream is not None and not text.endswith("\ufffd"):  # a byte-level token split mid-character
            safe = text if self.stopped else text[: len(text) - _stop_prefix_len(text, job.stop)]
            if safe.startswith(self.sent) and len(safe) > len(self.sent):
                job.emit(safe[len(self.sent):])
                self.sent = safe
        return self.stopped

    def result(self, ids: list[int] | None = None, reason: str | None = None) -> Result:
        """The final text and counts. `ids`: the row as generate returned it (padded after its end), else the
        tokens pushed. `reason`: forced ("cancelled"), else stop string / EOS -> "stop", the limit -> "length"."""
        ids = list(self.ids if ids is None else ids)
        n = next((k + 1 for k, t in enumerate(ids) if t in self.eos), None)
        hit_eos = n is not None
        if n is None:  # rows ended by a stop string or a cancel are padded after their last token
            n = len(ids)
            while n > 0 and ids[n - 1] == self.pad:
                n -= 1
        text, stopped = _cut_at_stop(self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), self.job.stop)
        limit = self.job.settings.get("max_new_tokens")
        if reason is None:
            reason = "stop" if stopped or hit_eos or limit is None or n < limit else "length"
        if self.job.stream is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.emit(text[len(self.sent):])  # whatever the stream held back
            self.sent = text
        return Result(text, reason, self.prompt_tokens, n)

    def finish(self, reason: str | None = None) -> None:
        self.job.resolve(self.result(None, reason))


class _Tracker(BaseStreamer, StoppingCriteria):
    """Per-row bookkeeping during one `generate`: streams each row's new text to its job (greedy/sampling),
    and finishes a row early when its job was cancelled or its text reached one of its stop strings."""

    def __init__(self, rows: list[_RowText], beams: int):
        self.rows, self.beams = rows, beams

    # BaseStreamer: the first put is the prompt (2-D), then one token per row per step (1-D).
    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:
            for row, token in zip(self.rows, value.tolist()):
                if not (row.stopped or (row.ids and row.ids[-1] in row.eos)):  # finished rows get pads
                    row.push(token)

    def end(self) -> None:
        pass

    # StoppingCriteria: (rows,) bool, True where a row may stop. Rows are batch * beams under beam search.
    # It runs before the streamer sees the step's token, so stop strings are looked for in `input_ids`.
    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        flags = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(self.rows):
            stop = row.job.cancelled.is_set()
            if not stop and row.job.stop and self.beams == 1:
                text = row.tokenizer.decode(input_ids[i].tolist(), skip_special_tokens=True)
                stop = any(s and s in text for s in row.job.stop)
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
