"""Stage-1 objectives (REFERENCE §2): ITC, hard-negative mining for ITM, ITM and ITG losses.

Everything cross-process takes `world_size`/`rank` explicitly; at world size 1 the gathers need no process
group and carry gradient exactly as they do at world size N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip2.nn.distributed import gather_no_grad, gather_with_grad
from blip2.nn.masks import MASKED

LABEL_SMOOTHING = 0.1  # ITC and ITG (REFERENCE §2); ITM has none.


def max_over_queries(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """image_feats (Bi, Q, E), text_feats (Bt, E), both normalised -> (Bi, Bt): each pair keeps its best
    query's cosine (REFERENCE §2: max over the 32 queries)."""
    return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def itc_targets(
    batch: int, total: int, rank: int, image_ids: torch.Tensor | None, all_image_ids: torch.Tensor | None, device
) -> torch.Tensor:
    """Soft targets (B, W*B). With image ids every gathered item of the same image is a positive
    (REFERENCE §2, COCO retrieval fine-tune); without, the positive is this rank's diagonal."""
    if image_ids is None or all_image_ids is None:
        target = torch.zeros(batch, total, device=device)
        target[torch.arange(batch, device=device), rank * batch + torch.arange(batch, device=device)] = 1.0
        return target
    positive = (image_ids.view(-1, 1) == all_image_ids.view(1, -1)).float()
    return positive / positive.sum(dim=1, keepdim=True)


def positive_mask(batch: int, total: int, rank: int, image_ids=None, all_image_ids=None, device=None) -> torch.Tensor:
    """(B, W*B) bool: which gathered items count as this row's positive."""
    return itc_targets(batch, total, rank, image_ids, all_image_ids, device) > 0


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor,
    world_size: int = 1,
    rank: int = 0,
    image_ids: torch.Tensor | None = None,
    gather_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image_feats (B, Q, E) and text_feats (B, E) normalised; temp a learnable scalar (init 0.07, never
    clamped in BLIP-2). Returns (loss, sim_i2t (B, W*B), sim_t2i (B, W*B)), similarities divided by temp.

    `gather_grad=False` (LAVIS, whose recipes REFERENCE §5 were tuned with it): the gathered side, this
    rank's own rows included, carries no gradient, so the image->text term trains only the image side and the
    text->image term only the text side. `gather_grad=True` (open_clip's gather-with-grad): both terms reach
    both sides, about twice the ITC gradient. Either way N processes under DDP equal one on the global batch.
    """
    gather = (lambda x: gather_with_grad(x, world_size, rank)) if gather_grad else (lambda x: gather_no_grad(x, world_size))
    all_image = gather(image_feats)  # (W*B, Q, E)
    all_text = gather(text_feats)  # (W*B, E)
    sim_i2t = max_over_queries(image_feats, all_text) / temp  # (B, W*B)
    sim_t2i = max_over_queries(all_image, text_feats).t() / temp  # (B, W*B)

    batch, total = text_feats.shape[0], all_text.shape[0]
    all_ids = gather_no_grad(image_ids, world_size) if image_ids is not None else None
    target = itc_targets(batch, total, rank, image_ids, all_ids, text_feats.device)
    if image_ids is None:
        # Hard targets with label smoothing 0.1, the LAVIS formulation.
        hard = target.argmax(dim=1)
        loss = (
            F.cross_entropy(sim_i2t, hard, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, hard, label_smoothing=LABEL_SMOOTHING)
        ) / 2
    else:
        # Soft targets mixed as 0.9 * target + 0.1 * uniform: equal to label smoothing when ids are unique.
        soft = (1 - LABEL_SMOOTHING) * target + LABEL_SMOOTHING / total
        loss = (
            -(F.log_softmax(sim_i2t, dim=1) * soft).sum(1).mean() - (F.log_softmax(sim_t2i, dim=1) * soft).sum(1).mean()
        ) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """sim (B, W*B) similarities/temp, positives (B, W*B) bool -> (B,) index of one negative per row, drawn
    with probability softmax(sim) over the non-positives (REFERENCE §2). Never returns a positive."""
    if bool(positives.all(dim=1).any()):
        raise ValueError(
            "ITM hard-negative mining needs at least one non-matching item per sample; "
            "use a (global) batch with at least two different images"
        )
    weights = F.softmax(sim.float().masked_fill(positives, MASKED), dim=1)
    weights = weights.masked_fill(positives, 0.0)  # exp(-10000) is already 0 in fp32; make it exact anyway
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(itm_logits: torch.Tensor, num_positive: int) -> torch.Tensor:
    """itm_logits (3B, 2) over pairs [pos; text-with-negative-image; image-with-negative-text]; the first
    `num_positive` are matches. Plain CE, no smoothing."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(itm_logits, labels)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) of the [DEC] text; labels (B, T) (pad = -100). Next-token CE: position t predicts
    t+1, so [DEC] is never a target and [SEP] is; label smoothing 0.1 (REFERENCE §2)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=LABEL_SMOOTHING)
