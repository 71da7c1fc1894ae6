"""Decoder-only LLMs (OPT, Llama family, GGUF files): the soft prompt goes before the text (REFERENCE §3)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

IGNORE = -100


class CausalLanguageModel:
    """A view over a transformers causal LM; holds no weights of its own."""

    is_encoder_decoder = False

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.width = model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def _inputs(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # [prefix (Q); text (T)]. Left padding of the text leaves pads between the prefix and the text: masked,
        # and position ids come from the mask's cumulative sum, so the result equals the unpadded sequence.
        embeds = torch.cat([prefix.to(self.model.dtype), self.embed(input_ids)], dim=1)  # (B, Q+T, H)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        return embeds, mask

    def logits(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        embeds, mask = self._inputs(prefix, input_ids, attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=mask, **kw).logits  # (B, Q+T, V)

    def loss(
        self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        """Mean next-token CE over `labels` (B, T) (-100 = ignored). The prefix positions are never targets,
        but the last one predicts the first text token, so the BOS is trained, as in LAVIS (REFERENCE §3)."""
        embeds, mask = self._inputs(prefix, input_ids, attention_mask)
        full = torch.cat([labels.new_full(prefix.shape[:2], IGNORE), labels], dim=1)
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=full, **kw).loss

    @torch.no_grad()
    def generate(
        self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generation: Any
    ) -> torch.Tensor:
        """Returns only the new tokens (B * num_return_sequences, N)."""
        embeds, mask = self._inputs(prefix, input_ids, attention_mask)
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **generation)
