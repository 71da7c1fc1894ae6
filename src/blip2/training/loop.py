"""Small pieces every recipe's loop uses: seeding, mixed precision, the resumable training state, DDP
wrapping, throughput, and the result a recipe returns. No BLIP-2 code here (DESIGN §3)."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blip2.training.checkpoint import rng_state, set_rng_state
from blip2.training.distributed import DistEnv, gather_objects

log = logging.getLogger("blip2.training")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on the run's device; a no-op context in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (bf16 does not)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def wrap_ddp(module: nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """DDP over `module` at world size > 1 (its forward must compute the loss, so DDP's hooks fire)."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def no_sync(module: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last one."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def clip_and_step(module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                  grad_clip: float) -> float | None:
    """Unscale (fp16), clip the global grad norm when `grad_clip` > 0, step, zero the grads. Returns the
    grad norm when clipping."""
    norm = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def training_state(env: DistEnv, optimizer, scheduler, scaler, micro_batches: int,
                   generators: dict[str, torch.Generator], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What state.pt holds besides the weights. Collective: every rank must call it (RNG states are gathered)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "micro_batches": micro_batches,
        "world_size": env.world_size,
        "rng": gather_objects(rng_state(generators), env),
        **(extra or {}),
    }


def restore_training_state(state: dict[str, Any], env: DistEnv, optimizer, scheduler, scaler,
                           generators: dict[str, torch.Generator], config: dict[str, Any] | None = None) -> None:
    """Load optimizer/scheduler/scaler and this rank's RNG states. The scheduler keeps the *current*
    config's schedule (a resumed run may extend `steps`); only its position comes from the checkpoint."""
    optimizer.load_state_dict(state["optimizer"])
    schedule = [dict(vars(f)) for f in scheduler.lr_lambdas]
    scheduler.load_state_dict(state["scheduler"])
    for fn, now in zip(scheduler.lr_lambdas, schedule):
        if vars(fn) != now:
            log.warning("the learning-rate schedule differs from the checkpoint's; using this run's: %s", now)
        vars(fn).update(now)
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)  # LambdaLR's own formula: bit-identical when unchanged
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    before = state.get("config") or {}
    changed = [k for k in ("batch_size", "grad_accum") if k in before and before[k] != (config or {}).get(k)]
    if changed or state.get("world_size") != env.world_size:
        warnings.warn(
            f"the global batch changed since the checkpoint ({', '.join(changed) or 'world size'}): the data position "
            "is kept in micro-batches, so this run continues from a nearby, not the exact, point of the epoch",
            stacklevel=2,
        )
    rngs = state.get("rng") or []
    if state.get("world_size") == env.world_size and len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank], generators)
    else:
        warnings.warn(
            f"the checkpoint was written by {state.get('world_size')} processes and this run has {env.world_size}: "
            "random states are re-seeded, so the run continues correctly but not bit-for-bit",
            stacklevel=2,
        )


class Throughput:
    """Samples per second over the last `window` steps."""

    def __init__(self, window: int = 20):
        self.window, self.marks = window, [(time.perf_counter(), 0)]

    def update(self, samples: int) -> float:
        now = time.perf_counter()
        total = self.marks[-1][1] + samples
        self.marks = (self.marks + [(now, total)])[-(self.window + 1) :]
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


@dataclass
class TrainResult:
    """What a recipe's `run` returns (the numbers also land in metrics.jsonl)."""

    output_dir: Path
    losses: list[float] = field(default_factory=list)  # the global-batch loss of each step this run took
    parts: dict[str, list[float]] = field(default_factory=dict)  # e.g. itc/itm/itg per step
    first_step: int = 0  # steps done before this run (resume)
    last_step: int = 0
    checkpoint: Path | None = None
    final_dir: Path | None = None
    skipped_images: int = 0
    steps_per_s: float = 0.0
    samples_per_s: float = 0.0
    plot: Path | None = None
    validation: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_...": ...} per validation
