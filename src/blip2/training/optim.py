"""AdamW with BLIP-2's decay groups and the linear-warmup + cosine schedule (REFERENCE §5).

- Weight decay 0.05 on weight matrices; none on 1-D parameters (LayerNorm, biases, the temperature) or
  anything named `bias` (LAVIS `get_optimizer_params`). Frozen parameters (requires_grad False) are left out.
- The learning rate rises linearly from `warmup_start_lr` to `lr` over `warmup_steps`, then follows a cosine
  from `lr` down to `min_lr` at `total_steps`. LAVIS warms up during epoch 0 and then steps the cosine per
  epoch; we step both per optimizer step, which is what the paper describes (2k warmup steps, cosine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or name == "bias"


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups over the trainable parameters: with decay (matrices) and without (1-D, biases).

    Each group carries the parameter names under "names" (AdamW ignores the extra key; it helps debugging
    and lets tests check the split)."""
    decay, plain, decay_names, plain_names = [], [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if no_decay(name, p):
            plain.append(p)
            plain_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    if not decay and not plain:
        raise ValueError("the model has no trainable parameters (everything has requires_grad=False)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "names": plain_names})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters (paper: β = (0.9, 0.98), wd 0.05)."""
    return torch.optim.AdamW(param_groups(model.named_parameters(), weight_decay), lr=lr, betas=betas, eps=eps)


def warmup_cosine(step: int, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                  warmup_start_lr: float = 0.0) -> float:
    """The learning rate at optimizer step `step` (0-based: the rate the step-th update uses)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """`warmup_cosine` as a LambdaLR factor (lr(step) / lr). A plain object, not a lambda, so the scheduler's
    state_dict saves it and loads it back (with torch.load(weights_only=True))."""

    def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 warmup_start_lr: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps
        self.min_lr, self.warmup_start_lr = min_lr, warmup_start_lr

    def __call__(self, step: int) -> float:
        lr = warmup_cosine(step, self.lr, self.total_steps, self.warmup_steps, self.min_lr, self.warmup_start_lr)
        return lr / self.lr


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                    warmup_start_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: call `.step()` after every optimizer step. The peak is each group's initial lr."""
    peak = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(peak, total_steps, warmup_steps, min_lr, warmup_start_lr)
    )
