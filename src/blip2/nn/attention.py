"""Multi-head attention over SDPA, with names that match transformers' BLIP-2 checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


class MultiHeadAttention(nn.Module):
    """query/key/value projections; keys and values may come from another stream (cross-attention)."""

    def __init__(self, hidden_size: int, num_heads: int, kv_size: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        kv_size = kv_size or hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_size, hidden_size)
        self.value = nn.Linear(kv_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """x (B, L, D); context (B, N, Dkv) or None for self-attention; past: cached (k, v) prepended to the
        keys (the ITG pass reuses the queries' keys/values). Returns (B, L, D) and this call's full (k, v)."""
        source = x if context is None else context
        q = self._heads(self.query(x))
        k, v = self._heads(self.key(source)), self._heads(self.value(source))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if mask is not None:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1), (k, v)  # (B, L, D)


class AddNorm(nn.Module):
    """Linear, dropout, residual add, LayerNorm: BERT's post-LN output block (`*.output` in checkpoints)."""

    def __init__(self, in_size: int, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)  # noqa: N815 (checkpoint name)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)
