"""Encoder-decoder LLMs (T5, Flan-T5): the soft prompt and the text prefix go to the encoder, the suffix is
the decoder's target (REFERENCE §3)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

IGNORE = -100


class Seq2SeqLanguageModel:
    """A view over a transformers encoder-decoder LM; holds no weights of its own."""

    is_encoder_decoder = True

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.width = model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def _encoder_inputs(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        text = self.embed(input_ids)  # on the embeddings' device: the first one of a device-mapped LLM
        embeds = torch.cat([prefix.to(text.device, text.dtype), text], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1).to(text.device)
        return embeds, mask  # (B, Q+T, H), (B, Q+T)

    def logits(
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        **kw: Any,
    ) -> torch.Tensor:
        embeds, mask = self._encoder_inputs(prefix, input_ids, attention_mask)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            **kw,
        )
        return out.logits

    def loss(
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
        **kw: Any,
    ) -> torch.Tensor:
        """`labels` (B, S): the suffix tokens (pad -> -100); T5 shifts them right itself."""
        embeds, mask = self._encoder_inputs(prefix, input_ids, attention_mask)
        out = self.model(
            inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_attention_mask, **kw
        )
        return out.loss

    @torch.no_grad()
    def generate(
        self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generation: Any
    ) -> torch.Tensor:
        """Returns the decoder tokens without the decoder start token."""
        embeds, mask = self._encoder_inputs(prefix, input_ids, attention_mask)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **generation)
        return out[:, 1:]
