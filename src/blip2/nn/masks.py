"""The three self-attention masks of stage 1 (REFERENCE §2), as additive float masks.

Rows attend to columns. Masked entries get -10000, not -inf, as BERT and LAVIS do (REFERENCE §1): a row
whose keys are all masked (a padding row) then stays finite instead of turning into NaN.

| objective | Q→Q | Q→T  | T→Q | T→T                  |
| ITC       | all | none | none| all non-pad (separate passes) |
| ITM       | all | all non-pad | all | all non-pad    |
| ITG       | all | none | all | causal, non-pad      |
"""

from __future__ import annotations

import torch

MASKED = -10000.0


def to_additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool/0-1 'may attend' tensor -> additive mask (0 where allowed, -10000 where not)."""
    return (1.0 - allowed.to(dtype)) * MASKED


def padding_mask(key_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L) 1 = real token -> (B, 1, 1, L): every row sees every real key (ITC text pass)."""
    return to_additive(key_mask[:, None, None, :], dtype)


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ITM: [queries; text] see each other both ways, padding excluded. -> (B, 1, 1, Q+T)."""
    ones = text_mask.new_ones(text_mask.shape[0], num_queries)
    return padding_mask(torch.cat([ones, text_mask], dim=1), dtype)


def multimodal_causal_mask(
    num_queries: int, text_mask: torch.Tensor, with_query_rows: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ITG: queries see only queries; text sees all queries and earlier non-pad text.

    With `with_query_rows=False` only the text rows are returned, (B, 1, T, Q+T): the form used when the
    queries' keys/values come from a cache (REFERENCE §2, ITG reuses the query pass).
    """
    batch, length = text_mask.shape
    device = text_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # (T, T)
    text_rows = torch.cat(
        [torch.ones(length, num_queries, dtype=torch.bool, device=device), causal], dim=1
    )  # (T, Q+T)
    key_ok = torch.cat([text_mask.new_ones(batch, num_queries), text_mask], dim=1).bool()  # (B, Q+T)
    rows = text_rows[None] & key_ok[:, None, :]  # (B, T, Q+T)
    if with_query_rows:
        query_rows = torch.zeros(num_queries, num_queries + length, dtype=torch.bool, device=device)
        query_rows[:, :num_queries] = True
        rows = torch.cat([query_rows[None].expand(batch, -1, -1), rows], dim=1)  # (B, Q+T, Q+T)
    return to_additive(rows[:, None], dtype)
