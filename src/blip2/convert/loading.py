"""Read safetensors checkpoints one tensor at a time, cast as read, placed straight on the target device.

Why not `safetensors.safe_open`: it memory-maps the whole shard, and every page a read touches stays in the
process's resident set until the file is closed, so a 10 GB fp32 shard read for a bf16 model still peaks at
model + shard. Here each tensor is read with plain file reads in chunks of `CHUNK_BYTES` into a small reusable
buffer and cast into its preallocated destination: the peak is the model in the requested dtype plus one chunk
per reader thread.

Why threads (READ_THREADS, 3): one reader waits for the disk while it casts nothing, and casts at one core's
speed. Several readers, each with its own file handle and its own reused buffer, overlap the two: file reads
(`readinto`) and torch's copies run without the GIL, so the threads really run at once (measured: 3.6x faster
than one reader here, and faster than transformers' loader; see READ_THREADS). Tensors still come out in file
order, and each one is read and cast exactly as with one reader (tested bit-identical), so the thread count
changes the time, never a weight.

The dtype rule is `checkpoint.cast`'s, applied per tensor (tested bit-identical to load-then-cast): with a
low-precision dtype only the frozen towers and the projection (LOW_PRECISION_PARTS) take it; the Q-Former, its
queries and the heads stay as stored (float32 in every published checkpoint), as in transformers
(`_keep_in_fp32_modules`) and LAVIS (REFERENCE §3).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LOW_PRECISION_PARTS = ("vision_model", "language_model", "language_projection")
# 1 MiB: the buffer stays in the CPU's cache between the read and the cast (64 MiB went out to memory and
# back: 12.1-12.9 s vs 10.0-10.5 s for one reader, torch on 1 thread, to read ViT-g's 4.4 GiB fp32 shard into
# bf16 from a cold page cache, here).
# Disk speed does not depend on it: the kernel reads READ_AHEAD ahead of us (posix_fadvise).
CHUNK_BYTES = 1 << 20
READ_AHEAD = 256 << 20  # asked of the kernel per tensor (page cache, reclaimable: not the process's memory)
# Reader threads; the peak grows by one CHUNK_BYTES buffer per reader. Measured on this project's 2-core CPU
# (bench_memory.py: blip2-itm-vit-g in bf16 from a cold page cache, fastest of interleaved loads, torch on 2
# threads), two runs. Busy machine (load average 4-16): 3 readers 8.0 s, one reader in the main thread 29 s,
# transformers 9.0 s. Quieter: 3 readers 7.4 s, one reader in a pool thread 7.1 s, transformers 8.5 s.
READ_THREADS = 3

# safetensors' dtype names (https://github.com/huggingface/safetensors, format.md)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointFileError(ValueError):
    """A weights file that is not safetensors (or is truncated): the message names the file."""


def shard_files(folder: Path, prefix: str = "") -> list[Path]:
    """The safetensors file(s) of a checkpoint folder; with an index, only the shards holding `prefix` keys."""
    index = folder / WEIGHTS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / f for k, f in weight_map.items() if k.startswith(prefix)})
    return [folder / WEIGHTS]


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, {key: {"dtype", "shape", "data_offsets"}}) of one safetensors file."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointFileError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
        (size,) = struct.unpack("<Q", head)  # little-endian u64, then that many bytes of JSON
        try:
            header = json.loads(fh.read(size))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointFileError(f"{path} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return 8 + size, header


def target_dtype(key: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """`checkpoint.cast`'s rule for one tensor: None/float32 makes every float tensor float32; another dtype
    applies to floats under LOW_PRECISION_PARTS only; integers and bools keep their dtype."""
    if not stored.is_floating_point:
        return stored
    if dtype is None or dtype == torch.float32:
        return torch.float32
    return dtype if key.split(".", 1)[0] in LOW_PRECISION_PARTS else stored


def _read_into(
    fh, out: torch.Tensor, stored: torch.dtype, numel: int, path: Path, key: str,
    scratch: Callable[[], torch.Tensor],
) -> None:
    """Fill the flat `out` from the file position: straight into `out` when no cast or move is needed,
    otherwise through `scratch()`, one CHUNK_BYTES buffer per reader reused for every tensor (the only extra memory: a
    buffer allocated and freed per tensor left glibc's heap holding 2.3 GiB of freed pieces on Flan-T5-XL)."""
    direct = out.dtype == stored and out.device.type == "cpu"
    step = max(1, CHUNK_BYTES // stored.itemsize)
    buf = out if direct else scratch()[: min(step, numel) * stored.itemsize].view(stored)
    raw = memoryview(buf.view(torch.uint8).numpy()).cast("B")  # writable bytes over the tensor's memory
    for start in range(0, numel, step):
        n = min(step, numel - start)
        view = raw[start * stored.itemsize : (start + n) * stored.itemsize] if direct else raw[: n * stored.itemsize]
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise CheckpointFileError(f"{path} is truncated: tensor {key} ends past the end of the file")
            done += got
        if not direct:
            out[start : start + n].copy_(buf[:n])  # the cast (round to nearest even, as Tensor.to)


def _advise(fh, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):  # Linux and most Unixes; elsewhere plain reads do
        os.posix_fadvise(fh.fileno(), offset, length, os.POSIX_FADV_WILLNEED)


DtypeRule = Callable[[str, torch.dtype], torch.dtype]  # (key, stored dtype) -> dtype to hold it in


def cast_rule(dtype: torch.dtype | None) -> DtypeRule:
    """`target_dtype` for one requested model dtype."""
    return lambda key, stored: target_dtype(key, stored, dtype)


class _Job:
    """One tensor to read: where it lies in which shard, and what it becomes."""

    __slots__ = ("path", "key", "stored", "shape", "numel", "offset", "nbytes", "dtype")

    def __init__(self, path: Path, key: str, info: dict, data_start: int, rule: DtypeRule | None) -> None:
        if info["dtype"] not in _DTYPES:
            raise CheckpointFileError(f"{path}: tensor {key} has dtype {info['dtype']}, which we do not read")
        self.path, self.key = path, key
        self.stored = _DTYPES[info["dtype"]]
        self.shape = tuple(info["shape"])
        self.numel = math.prod(self.shape)
        begin, end = info["data_offsets"]
        if end - begin != self.numel * self.stored.itemsize:
            raise CheckpointFileError(f"{path}: tensor {key}'s byte range does not fit its shape {list(self.shape)}")
        self.offset, self.nbytes = data_start + begin, end - begin
        self.dtype = rule(key, self.stored) if rule else self.stored


def _jobs(folder: Path, rule: DtypeRule | None, keep: Callable[[str], bool], prefix: str) -> Iterator[_Job]:
    """Every tensor to read, shard by shard, in file order (reads go forward through each shard)."""
    for path in shard_files(folder, prefix):
        data_start, header = read_header(path)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if key.startswith(prefix) and keep(key):
                yield _Job(path, key, info, data_start, rule)


def _read_job(job: _Job, device: torch.device, scratch: Callable[[], torch.Tensor], ahead: int) -> torch.Tensor:
    """One tensor, read with its own file handle (so readers never share a file position) and cast."""
    out = torch.empty(job.numel, dtype=job.dtype, device=device)
    if job.numel:
        with open(job.path, "rb", buffering=0) as fh:
            # The kernel reads this tensor (and `ahead` bytes from its start) into its page cache, not ours,
            # while we cast.
            _advise(fh, job.offset, max(job.nbytes, ahead))
            fh.seek(job.offset)
            _read_into(fh, out, job.stored, job.numel, job.path, job.key, scratch)
    return out.view(job.shape)


def iter_tensors(
    folder: Path,
    rule: DtypeRule | None = None,
    device: str | torch.device | None = None,
    keep: Callable[[str], bool] = lambda key: True,
    prefix: str = "",
    threads: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every stored key starting with `prefix` that `keep` accepts, in file order, each
    in the dtype `rule` gives (None: as stored) and on `device` (CPU when None). `threads` readers
    (default READ_THREADS) read ahead of the consumer by at most two tensors each."""
    device = torch.device(device if device is not None else "cpu")
    threads = READ_THREADS if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads={threads}: loading needs at least one reader thread")
    local = threading.local()

    def scratch() -> torch.Tensor:  # one CHUNK_BYTES buffer per reader thread, made on its first cast
        if getattr(local, "buf", None) is None:
            local.buf = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        return local.buf

    # Even one reader reads in a pool thread, never in the caller's: the main-thread reader was the slow one
    # above (cause not pinned down). A bounded window of pending reads, collected in order: memory ahead of the consumer is a few tensors
    # (which the consumer keeps anyway when it builds a state dict) and one buffer per reader.
    pending: deque[tuple[str, Future]] = deque()
    ahead = READ_AHEAD if threads == 1 else 0
    pool = ThreadPoolExecutor(threads, thread_name_prefix="blip2-read")
    try:
        for job in _jobs(folder, rule, keep, prefix):
            # Several readers ask the kernel for their own tensor only: the other readers are the read-ahead
            # (the same 256 MiB asked by every reader over its neighbours' ranges measured slower on this disk).
            pending.append((job.key, pool.submit(_read_job, job, device, scratch, ahead)))
            if len(pending) >= 2 * threads:
                key, future = pending.popleft()
                yield key, future.result()
        while pending:
            key, future = pending.popleft()
            yield key, future.result()
    finally:  # an error, or a consumer that stops early: drop the reads not started, wait for the rest
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def read_state(
    folder: Path,
    rule: DtypeRule | None = None,
    device: str | torch.device | None = None,
    keep: Callable[[str], bool] = lambda key: True,
    prefix: str = "",
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """`iter_tensors` collected: the state dict in its final dtype and place, never a float32 copy of it."""
    return dict(iter_tensors(folder, rule, device, keep, prefix, threads))
