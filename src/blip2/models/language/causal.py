"""Decoder-only LLMs (OPT, Llama family, GGUF files): the soft prompt goes before the text (REFERENCE §3)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from blip2.models.language import kv_cache
from blip2.models.language import fast_decode
from blip2.models.language.fast_decode import prefill_once_per_row, repeated_rows

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
        text = self.embed(input_ids)  # on the embeddings' device: the first one of a device-mapped LLM
        embeds = torch.cat([prefix.to(text.device, self.model.dtype), text], dim=1)  # (B, Q+T, H)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1).to(text.device)
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
        self,
        prefix: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache | None = None,
        **generation: Any,
    ) -> torch.Tensor:
        """Returns only the new tokens (B * num_return_sequences, N). `cache`: keys/values of the first positions
        of [prefix; text], one row per sequence `generate` runs (B * num_beams); only the rest is prefilled, and
        the cache is updated in place (kv_cache.py). With the compiled decode on (fast_decode.py), a dynamic
        `cache` is copied into a static one and only a StaticCache long enough is updated in place."""
        embeds, mask = self._inputs(prefix, input_ids, attention_mask)
        compiled = fast_decode.compiled_decode_settings(self.model, generation)  # opt-in only
        if compiled:
            # A static cache (a passed one's keys/values copied in, unless it is static and long enough already:
            # a chat passes its kept static cache, which must be the one updated) for the compiled decode steps.
            cache = fast_decode.static_cache(self.model, fast_decode.total_length(self.model, generation, embeds.shape[1]), cache)
            generation.update(compiled)
        if cache is not None:
            generation["cache"] = cache
        # Beam search repeats each row num_beams times before its prefill: that prefill runs once per row
        # (fast_decode.py; it steps aside when a non-empty cache is passed).
        with prefill_once_per_row(self.model, repeated_rows(self.model, generation)):
            return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **generation)

    @torch.no_grad()
    def generate_shared(
        self, prefixes: torch.Tensor, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        **generation: Any,
    ) -> torch.Tensor:
        """`generate(prefixes[rows], input_ids, attention_mask)` that prefills each distinct prefix once.

        prefixes (U, Q, H): e.g. the soft prompts of U images; rows (B,): the prefix of each text row (many
        questions about one image: all zeros). The prefixes' keys/values are computed in one pass of U rows and
        copied to the B rows, the texts but their last token are prefilled on B rows, and only then is the cache
        copied to the B * num_beams rows beam search runs, so `generate` prefills one token per beam instead of
        Q + T. Pads sit between the prefix and a left-padded text: masked, positions from the mask (kv_cache.py).
        Falls back to the plain path when sharing would save nothing or the LLM/settings do not allow it. With the
        compiled decode on, `generate` copies the shared cache into a static one and decodes compiled."""
        expand = kv_cache.rows_per_sequence(self.model, generation) if kv_cache.can_keep(self.model) else None
        if expand is None or (expand == 1 and rows.unique().numel() == rows.numel()):
            return self.generate(prefixes[rows], input_ids, attention_mask, **generation)
        queries = prefixes.shape[1]
        cache = kv_cache.new_cache(self.model)
        first = self.model.get_input_embeddings().weight.device  # a device-mapped LLM's first device
        kv_cache.prefill(self.model, cache, prefixes.to(first, self.model.dtype))  # (U, Q): no padding
        cache.batch_select_indices(rows.cpu())  # (B, Q); CPU indices index every layer's device
        embeds, mask = self._inputs(prefixes[rows], input_ids, attention_mask)  # (B, Q+T, H), (B, Q+T)
        if input_ids.shape[1] > 1:  # generate needs at least one position left to prefill
            positions = kv_cache.positions(mask)
            kv_cache.prefill(self.model, cache, embeds[:, queries:-1], mask[:, :-1], positions[:, queries:-1])
        if expand > 1:
            cache.batch_repeat_interleave(expand)  # row b -> rows b*expand .. b*expand+expand-1, as generate expands
        compiled = fast_decode.compiled_decode_settings(self.model, generation)  # opt-in only
        if compiled:
            cache = fast_decode.static_cache(self.model, fast_decode.total_length(self.model, generation, embeds.shape[1]), cache)
            generation = {**generation, **compiled}
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, cache=cache, **generation)
