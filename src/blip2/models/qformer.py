"""The Q-Former (REFERENCE §1): a BERT-style encoder whose first Q positions are learned queries.

One layer, top to bottom:
  1. self-attention over the whole sequence [queries; text], under the objective's mask (nn/masks.py);
  2. query positions only, every `cross_attention_frequency`-th layer: cross-attention to the image;
  3. a feed-forward block, separate for queries (`*_query`) and text.
All blocks are post-LN (LayerNorm after each residual add). Module names follow transformers'
`Blip2QFormerModel`, so its checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from blip2.models.config import QFormerConfig
from blip2.nn.attention import AddNorm, KeyValue, MultiHeadAttention


class Attention(nn.Module):
    """Attention followed by its post-LN output block (`attention.attention`, `attention.output`)."""

    def __init__(self, cfg: QFormerConfig, kv_size: int | None = None):
        super().__init__()
        self.attention = MultiHeadAttention(
            cfg.hidden_size, cfg.num_attention_heads, kv_size, dropout=cfg.attention_probs_dropout_prob
        )
        self.output = AddNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        out, kv = self.attention(x, context, mask, past)
        return self.output(out, x), kv


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg)
        # REFERENCE §1: layer i has cross-attention when i % cross_attention_frequency == 0.
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, kv_size=cfg.encoder_hidden_size)
        if cfg.use_text_input:
            self.intermediate = Intermediate(cfg)
            self.output = AddNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int,
        image: torch.Tensor | None,
        mask: torch.Tensor | None,
        past: KeyValue | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        x, kv = self.attention(x, mask=mask, past=past)  # (B, L, D)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries > 0:
            if self.has_cross_attention:
                if image is None:
                    raise ValueError("the queries need image features: this layer cross-attends to the image")
                queries, _ = self.crossattention(queries, context=image)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            if not hasattr(self, "intermediate"):
                raise ValueError("this Q-Former has no text side (built with use_text_input=False)")
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], kv


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False


class QFormer(nn.Module):
    """Embedding LayerNorm + layers. The learned queries and the text embeddings live on the BLIP-2 model
    (as in transformers), so this module takes embeddings in and gives hidden states out."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)

    def forward(
        self,
        embeds: torch.Tensor,
        num_queries: int,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: list[KeyValue] | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """embeds (B, L, D) = [queries (Q); text (L-Q)]; image (B, N, Dv); mask additive (B, 1, L|1, Lk);
        past: per-layer cached (k, v) of earlier positions (the queries, for ITG).
        Returns hidden states (B, L, D) and the per-layer (k, v) of everything seen, for reuse."""
        # REFERENCE §1: the embedding LayerNorm runs over the whole [queries; text] concatenation.
        x = self.dropout(self.layernorm(embeds))
        image = image.to(x.dtype) if image is not None else None
        present: list[KeyValue] = []
        for i, layer in enumerate(self.encoder.layer):
            layer_past = past[i] if past is not None else None
            if self.encoder.gradient_checkpointing and self.training:
                x, kv = torch.utils.checkpoint.checkpoint(
                    layer, x, num_queries, image, mask, layer_past, use_reentrant=False
                )
            else:
                x, kv = layer(x, num_queries, image, mask, layer_past)
            present.append(kv)
        return x, present
