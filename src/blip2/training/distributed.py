"""torchrun setup: who am I (world size, rank, local rank), which device, and the process group.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python` run has none of
them and gets world size 1 with no process group at all (STYLE: world size 1 needs no process group).
The backend is NCCL on CUDA and gloo on CPU (DESIGN §4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU when there is one, else CPU; "cpu"; "cuda" (error without a GPU)."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no GPU; use device=cpu or device=auto")
        if preference == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(preference)


def setup_distributed(device: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Read torchrun's environment; at world size > 1 start the process group (once) and bind the GPU."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: start the run with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, world_size=world_size, rank=rank, timeout=timeout, **kwargs)
    return DistEnv(world_size, rank, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalars over ranks (for logging: every rank's local loss -> the global-batch loss)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    t /= env.world_size
    return dict(zip(keys, t.tolist()))


def sum_over_ranks(value: int, env: DistEnv) -> int:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(t)
    return int(t.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small picklable things: RNG states)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def run_distributed(train, cfg, device: str, cpu_threads: int = 0):
    """Set threads and the process group (when torchrun started us and nobody else did), call
    `train(cfg, env)`, and tear down what we set up: the recipes' shared entry."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    env = setup_distributed(device)
    try:
        return train(cfg, env)
    finally:
        if owns_group:
            cleanup_distributed()
