"""Cross-process gathers for the contrastive losses. World size and rank are arguments; at world size 1
they need no process group and keep the gradient semantics they have at world size N."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice, summed over ranks: N
    processes then train exactly as one process on the global batch (open_clip's `gather_with_grad`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch], None, None


def gather_with_grad(x: torch.Tensor, world_size: int = 1, rank: int = 0) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...), differentiable into every rank's slice."""
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x, world_size, rank)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) without gradient (LAVIS's `concat_all_gather`), this rank's own slice included."""
    if world_size == 1:
        # Detached too: returning `x` would keep it in the graph, so one process would train differently
        # from N (LAVIS always initialises a process group, so its gather copies even at world size 1).
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
