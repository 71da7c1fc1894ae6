"""The BLIP-2 model: frozen image encoder -> Q-Former -> (stage 1 heads | projection into a frozen LLM).

Parameter names follow transformers' `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`
(DESIGN §4), so their checkpoints load as they are. Stage-1 parts transformers lacks are `temp` and
`qformer_lm_head.*`. Models take tensors; nothing here tokenizes (DESIGN §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from blip2.models import losses
from blip2.models.config import Blip2Config, QFormerConfig
from blip2.models.language import build_language_model, language_view
from blip2.models.language.base import LanguageModel
from blip2.models.qformer import QFormer
from blip2.models.vision import build_vision_encoder
from blip2.nn import masks
from blip2.nn.attention import KeyValue


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the Q-Former's text (no LayerNorm here: the Q-Former's
    `layernorm` runs over [queries; text], REFERENCE §1). Position ids start at 0 after the queries."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]  # (B, T, D)


class QFormerLMHead(nn.Module):
    """BERT's MLM prediction head (LAVIS `Qformer.cls.predictions`); its decoder is tied to the word
    embeddings, so only the transform and the bias are parameters here."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACT2FN[cfg.hidden_act]
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.transform.LayerNorm(self.act(self.transform.dense(hidden)))
        return F.linear(h, word_embeddings, self.bias)  # (B, T, V)


@dataclass
class QueryOutput:
    """The queries after the Q-Former: hidden states (B, Q, D) and each layer's self-attention (k, v),
    which ITG reuses instead of recomputing the queries (REFERENCE §2)."""

    hidden: torch.Tensor
    cache: list[KeyValue]


class Blip2Model(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        qcfg = config.qformer
        self.vision_model = build_vision_encoder(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        if qcfg.use_text_input:
            self.embeddings = TextEmbeddings(qcfg)
        self.qformer = QFormer(qcfg)
        if config.stage1_heads:
            self.vision_projection = nn.Linear(qcfg.hidden_size, config.image_text_hidden_size)
            self.text_projection = nn.Linear(qcfg.hidden_size, config.image_text_hidden_size)
            self.itm_head = nn.Linear(qcfg.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))  # REFERENCE §2: init 0.07, never clamped
        if config.itg_head:
            self.qformer_lm_head = QFormerLMHead(qcfg)
        if config.language is not None:
            self.language_projection = nn.Linear(qcfg.hidden_size, config.language.hidden_size)
            self.language_model = build_language_model(config.language)
        self.init_trainable_weights()
        self.freeze_frozen_parts()

    # -- setup --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_trainable_weights(self) -> None:
        """BERT init for what BLIP-2 trains (REFERENCE §1): N(0, 0.02) weights, zero biases, unit LayerNorms.
        Checkpoints overwrite this; it matters for training from scratch."""
        std = self.config.qformer.initializer_range
        nn.init.normal_(self.query_tokens, std=std)
        for name, module in self.named_modules():
            if name.startswith(("vision_model", "language_model")):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def trainable_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the frozen towers that still train (the vision post-LN)."""
        return tuple(f"vision_model.{p}" for p in getattr(self.vision_model, "trainable_prefixes", ()))

    def freeze_frozen_parts(self) -> None:
        """Frozen = requires_grad False and eval mode, except the vision `post_layernorm` (ln_vision), which
        LAVIS trains (REFERENCE §1)."""
        keep = self.trainable_prefixes()
        for name, param in self.named_parameters():
            if name.startswith("language_model") or (name.startswith("vision_model") and not name.startswith(keep)):
                param.requires_grad_(False)
        self.train(self.training)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute the Q-Former's layers in backward (and an unfrozen vision tower's, where it supports it):
        less activation memory for ~30% more time, the same gradients."""
        self.qformer.encoder.gradient_checkpointing = on
        if hasattr(self.vision_model, "gradient_checkpointing"):
            self.vision_model.gradient_checkpointing = on

    def train(self, mode: bool = True) -> Blip2Model:
        super().train(mode)
        # The frozen towers never train: no dropout, no batch-norm statistics updates.
        self.vision_model.eval()
        if hasattr(self, "language_model"):
            self.language_model.eval()
        return self

    @property
    def lm(self) -> LanguageModel:
        if not hasattr(self, "language_model"):
            raise ValueError("this is a stage-1 model: it has no language model (load a stage-2 checkpoint)")
        return language_view(self.language_model)

    @property
    def num_queries(self) -> int:
        return self.config.num_query_tokens

    # -- encoders -----------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> frozen image features (B, N, Dv), after `post_layernorm` (ln_vision)."""
        return self.vision_model(pixel_values)

    def frozen_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen tower's output before its trainable post-LN: what `blip2 cache-features` stores."""
        return self.vision_model.frozen_features(pixel_values)

    def image_features_from_cache(self, frozen: torch.Tensor) -> torch.Tensor:
        """Cached frozen features (B, N, Dv) -> what `encode_image` gives: the trainable post-LN applied."""
        norm = self.vision_model.post_layernorm
        return norm(frozen.to(norm.weight.dtype))

    def query(self, image_feats: torch.Tensor) -> QueryOutput:
        """The queries read the image through cross-attention: -> (B, Q, D) + per-layer cache."""
        queries = self.query_tokens.expand(image_feats.shape[0], -1, -1)
        hidden, cache = self.qformer(queries, self.num_queries, image=image_feats)
        return QueryOutput(hidden, cache)

    def _text_side(self) -> TextEmbeddings:
        if not hasattr(self, "embeddings"):
            raise ValueError("this model has no Q-Former text side (a stage-2 checkpoint): ITC/ITM/ITG need one")
        return self.embeddings

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone through the Q-Former (ITC's uni-modal text pass) -> (B, T, D)."""
        embeds = self._text_side()(input_ids)
        hidden, _ = self.qformer(embeds, 0, mask=masks.padding_mask(attention_mask, embeds.dtype))
        return hidden

    # -- stage 1: ITC / ITM / ITG -------------------------------------------------------------------------
    def image_itc_features(self, query_hidden: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) -> normalised (B, Q, E)."""
        return F.normalize(self.vision_projection(query_hidden.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_itc_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> normalised [CLS] feature (B, E)."""
        return F.normalize(self.text_projection(text_hidden[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    def itc_similarity(self, image_feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw cosine, max over queries (no temperature), (Bi, Bt): the retrieval score (REFERENCE §6)."""
        image = self.image_itc_features(self.query(image_feats).hidden)
        text = self.text_itc_features(self.encode_text(input_ids, attention_mask))
        return losses.max_over_queries(image, text)

    def query_with_text(self, image_feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The queries reading the image and a text together, both ways (the ITM mask) -> (B, Q, D)."""
        batch = input_ids.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        embeds = torch.cat([queries, self._text_side()(input_ids).to(queries.dtype)], dim=1)  # (B, Q+T, D)
        mask = masks.bidirectional_mask(self.num_queries, attention_mask, embeds.dtype)
        hidden, _ = self.qformer(embeds, self.num_queries, image=image_feats, mask=mask)
        return hidden[:, : self.num_queries]

    def itm_logits(self, image_feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pairs (image i, text i) -> (B, 2) logits, the 2-class head averaged over the query outputs."""
        hidden = self.query_with_text(image_feats, input_ids, attention_mask)
        return self.itm_head(hidden.to(self.itm_head.weight.dtype)).mean(dim=1)

    def itg_logits(self, query: QueryOutput, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[DEC]-led text attending to the cached queries, causal over itself -> (B, T, V)."""
        embeds = self._text_side()(decoder_input_ids)
        mask = masks.multimodal_causal_mask(self.num_queries, attention_mask, with_query_rows=False, dtype=embeds.dtype)
        hidden, _ = self.qformer(embeds, 0, mask=mask, past=query.cache)
        return self.qformer_lm_head(hidden, self.embeddings.word_embeddings.weight)

    def stage1_losses(
        self,
        image_feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        dec_token_id: int,
        world_size: int = 1,
        rank: int = 0,
        image_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        gather_grad: bool = False,
    ) -> dict[str, torch.Tensor]:
        """ITC + ITM + ITG on a batch of matching (image, text) pairs (REFERENCE §2); the total is their sum.
        `gather_grad`: ITC's gather, see `losses.itc_loss` (False is LAVIS's).

        image_feats (B, N, Dv) from `encode_image`; input_ids (B, T) start with [CLS].
        """
        from blip2.nn.distributed import gather_no_grad, gather_with_grad

        batch = input_ids.shape[0]
        query = self.query(image_feats)
        image_feats_itc = self.image_itc_features(query.hidden)
        text_feats_itc = self.text_itc_features(self.encode_text(input_ids, attention_mask))
        loss_itc, sim_i2t, sim_t2i = losses.itc_loss(
            image_feats_itc, text_feats_itc, self.temp, world_size, rank, image_ids, gather_grad
        )

        # ITM: one hard negative image per text and one hard negative text per image, mined from ITC's values
        # (so the same draws with either gather, as LAVIS mines under no_grad).
        all_ids = gather_no_grad(image_ids, world_size) if image_ids is not None else None
        positives = losses.positive_mask(batch, sim_i2t.shape[1], rank, image_ids, all_ids, sim_i2t.device)
        neg_image = losses.sample_hard_negatives(sim_t2i, positives, generator)  # (B,) into the gathered batch
        neg_text = losses.sample_hard_negatives(sim_i2t, positives, generator)
        all_images = gather_with_grad(image_feats, world_size, rank)  # keeps gradient into ln_vision
        all_text_ids = gather_no_grad(input_ids, world_size)
        all_text_mask = gather_no_grad(attention_mask, world_size)
        itm_images = torch.cat([image_feats, all_images[neg_image], image_feats])  # (3B, N, Dv)
        itm_ids = torch.cat([input_ids, input_ids, all_text_ids[neg_text]])
        itm_mask = torch.cat([attention_mask, attention_mask, all_text_mask[neg_text]])
        loss_itm = losses.itm_loss(self.itm_logits(itm_images, itm_ids, itm_mask), batch)

        # ITG: [DEC] replaces [CLS]; the text reuses the query pass's keys/values.
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = dec_token_id
        labels = decoder_ids.masked_fill(attention_mask == 0, -100)
        loss_itg = losses.itg_loss(self.itg_logits(query, decoder_ids, attention_mask), labels)

        return {"loss": loss_itc + loss_itm + loss_itg, "itc": loss_itc, "itm": loss_itm, "itg": loss_itg}

    # -- stage 2: the frozen LLM --------------------------------------------------------------------------
    def soft_prompt(
        self, image_feats: torch.Tensor, qformer_text: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Image features -> queries -> LLM embedding space: (B, Q, H_llm) (REFERENCE §3). With
        `question_to_qformer`, `qformer_text` = (ids, mask) of the instruction in the Q-Former's tokenizer
        (the question; a caption prompt or ""): the queries read it together with the image, and only their
        outputs go on (`query_with_text`). This is InstructBLIP's instruction-aware Q-Former; transformers'
        `InstructBlipForConditionalGeneration.get_image_features` computes the same tensor."""
        if self.config.question_to_qformer:
            if qformer_text is None:
                raise ValueError("this model feeds the question to the Q-Former: pass qformer_text=(ids, mask)")
            hidden = self.query_with_text(image_feats, *qformer_text)
        else:
            hidden = self.query(image_feats).hidden
        return self.language_projection(hidden.to(self.language_projection.weight.dtype))

    def lm_logits(
        self, image_feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        qformer_text: tuple[torch.Tensor, torch.Tensor] | None = None, **kw: Any,
    ) -> torch.Tensor:
        return self.lm.logits(self.soft_prompt(image_feats, qformer_text), input_ids, attention_mask, **kw)

    def lm_loss(
        self, image_feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        qformer_text: tuple[torch.Tensor, torch.Tensor] | None = None, **kw: Any,
    ) -> torch.Tensor:
        """Stage-2 loss. Decoder-only: `input_ids` is the whole text, `labels` masks prompt/pad with -100.
        Encoder-decoder: `input_ids` is the prefix (encoder), `labels` the suffix (decoder target)."""
        return self.lm.loss(self.soft_prompt(image_feats, qformer_text), input_ids, attention_mask, labels, **kw)

    @torch.no_grad()
    def generate(
        self,
        image_feats: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        soft_prompt: torch.Tensor | None = None,
        **generation: Any,
    ) -> torch.Tensor:
        """Generate through the LLM's own `generate` on [soft prompt; prompt tokens] (DESIGN §4).

        Give `image_feats` (B, N, Dv) or an already computed `soft_prompt` (B, Q, H) — the chat and
        multi-question paths reuse one image's soft prompt. Returns only the generated tokens.
        """
        if soft_prompt is None:
            if image_feats is None:
                raise ValueError("generate needs image_feats or soft_prompt")
            soft_prompt = self.soft_prompt(image_feats)
        if input_ids is None:
            input_ids = torch.zeros(soft_prompt.shape[0], 0, dtype=torch.long, device=soft_prompt.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.lm.generate(soft_prompt, input_ids, attention_mask, **generation)
