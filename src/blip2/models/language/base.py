"""The interface every frozen LLM honours: embed, loss from a soft prompt, generate from a soft prompt."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class LanguageModel(Protocol):
    is_encoder_decoder: bool
    width: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def logits(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor: ...

    def loss(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor: ...

    def generate(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generation: Any) -> torch.Tensor: ...
