"""Read safetensors checkpoints one tensor at a time, cast as read, placed straight on the target device.

Why not `safetensors.safe_open`: it memory-maps the whole shard, and every page a read touches stays in the
process's resident set until the file is closed, so a 10 GB fp32 shard read for a bf16 model still peaks at
model + shard. Here each tensor is read with plain file reads in chunks of `CHUNK_BYTES` into a small reusable
buffer and cast into its preallocated destination: the peak is the model in the requested dtype plus one chunk.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LOW_PRECISION_PARTS = ("vision_model", "language_model", "language_projection")
CHUNK_BYTES = 64 << 20  # 64 MiB: large enough for full disk speed, small next to any model
READ_AHEAD = 256 << 20  # asked of the kernel per tensor (page cache, reclaimable: not the process's memory)

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
    fh, out: torch.Tensor, stored: torch.dtype, numel: int, path: Path, key: str, scratch: torch.Tensor
) -> None:
    """Fill the flat `out` from the file position: straight into `out` when no cast or move is needed,
    otherwise through `scratch`, one CHUNK_BYTES buffer reused for every tensor (the only extra memory: a
    buffer allocated and freed per tensor left glibc's heap holding 2.3 GiB of freed pieces on Flan-T5-XL)."""
    direct = out.dtype == stored and out.device.type == "cpu"
    step = max(1, CHUNK_BYTES // stored.itemsize)
    buf = out if direct else scratch[: min(step, numel) * stored.itemsize].view(stored)
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


def iter_tensors(
    folder: Path,
    rule: DtypeRule | None = None,
    device: str | torch.device | None = None,
    keep: Callable[[str], bool] = lambda key: True,
    prefix: str = "",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every stored key starting with `prefix` that `keep` accepts, one at a time, each
    in the dtype `rule` gives (None: as stored) and on `device` (CPU when None)."""
    device = torch.device(device if device is not None else "cpu")
    scratch = None
    for path in shard_files(folder, prefix):
        data_start, header = read_header(path)
        with open(path, "rb", buffering=0) as fh:
            # File order: reads go forward through the shard.
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if not key.startswith(prefix) or not keep(key):
                    continue
                if info["dtype"] not in _DTYPES:
                    raise CheckpointFileError(f"{path}: tensor {key} has dtype {info['dtype']}, which we do not read")
                stored = _DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                numel = math.prod(shape)
                begin, end = info["data_offsets"]
                if end - begin != numel * stored.itemsize:
                    raise CheckpointFileError(f"{path}: tensor {key}'s byte range does not fit its shape {list(shape)}")
                out = torch.empty(numel, dtype=rule(key, stored) if rule else stored, device=device)
                if numel:
                    # The kernel reads this tensor ahead (into its page cache, not ours) while we cast.
                    _advise(fh, data_start + begin, max(end - begin, READ_AHEAD))
                    fh.seek(data_start + begin)
                    if scratch is None:
                        scratch = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
                    _read_into(fh, out, stored, numel, path, key, scratch)
                yield key, out.view(shape)


def read_state(
    folder: Path,
    rule: DtypeRule | None = None,
    device: str | torch.device | None = None,
    keep: Callable[[str], bool] = lambda key: True,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """`iter_tensors` collected: the state dict in its final dtype and place, never a float32 copy of it."""
    return dict(iter_tensors(folder, rule, device, keep, prefix))
