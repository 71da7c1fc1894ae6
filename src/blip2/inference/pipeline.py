"""`blip2.load(...)` returns a `Blip2`: the object users call to caption, ask, chat, match and retrieve.

Every image is encoded once per call, whatever the number of questions or texts asked about it
(DESIGN §2); chat sessions keep the image's soft prompt for the whole conversation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blip2.convert.checkpoint import load_model
from blip2.data.images import ImageInput, ImageProcessor
from blip2.data.text import (
    QFORMER_MAX_TEXT,
    chat_prompt,
    tokenize_prompts,
    tokenize_qformer,
    vqa_template,
)
from blip2.inference.generation import (
    check_generation,
    check_max_prompt_tokens,
    check_prompt_length,
    llm_context,
    prompt_budget,
)
from blip2.models.blip2 import Blip2Model
from blip2.models.language import fast_decode, kv_cache

# REFERENCE §6: captions with 5 beams; VQA with 5 beams, at most 10 new tokens, length penalty -1.
CAPTION_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0}
VQA_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}
RETRIEVAL_K = 128  # REFERENCE §6: k_test


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Match:
    """One retrieval hit: the index of the image in the list searched, and its score."""

    index: int
    score: float  # the ranking score: ITM positive logit + ITC cosine (REFERENCE §6)
    itc: float  # ITC cosine, max over queries
    itm: float | None = None  # ITM match probability (softmax of the head), for re-ranked hits


class Blip2:
    """A loaded BLIP-2 model with its tokenizers and image processor.

    `max_prompt_tokens` caps the LLM prompt of every caption/ask/chat call that does not give its own cap
    (None: only the LLM's context limits it); a longer prompt fails before any image is encoded.
    """

    def __init__(
        self,
        model: Blip2Model,
        tokenizer=None,
        qformer_tokenizer=None,
        batch_size: int = 8,
        progress: bool | None = None,
        max_prompt_tokens: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.images = ImageProcessor(model.config.vision.image)
        self.batch_size = batch_size
        self.progress = progress
        self.max_prompt_tokens = check_max_prompt_tokens(max_prompt_tokens)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- plumbing -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    @property
    def is_encoder_decoder(self) -> bool:
        lang = self.model.config.language
        return bool(lang and lang.is_encoder_decoder)

    def _bar(self, total: int, desc: str):
        show = self.progress if self.progress is not None else total > 4 * self.batch_size
        return tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False)

    def _pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        dtype = next(self.model.vision_model.parameters()).dtype
        return self.images(list(images)).to(self.device, dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Frozen image features (B, N, Dv), computed in batches."""
        out = []
        with self._bar(len(images), "encoding images") as bar:
            for chunk in _chunks(images, self.batch_size):
                out.append(self.model.encode_image(self._pixels(chunk)))
                bar.update(len(chunk))
        return torch.cat(out)

    def _need_llm(self) -> None:
        if self.tokenizer is None or not hasattr(self.model, "language_model"):
            raise ValueError("this model has no language model: caption/ask/chat need a stage-2 checkpoint")

    def _need_qformer_text(self) -> None:
        if self.qformer_tokenizer is None or not self.model.config.stage1_heads:
            raise ValueError(
                "this model has no image-text matching heads: itm/similarity/retrieve need a stage-1 or "
                "retrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g)"
            )

    def _generation(self, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """The settings `generate` gets: defaults, then the caller's (None = unset), validated together so
        that min_new_tokens is checked against the max_new_tokens actually used."""
        gen = check_generation({**defaults, **{k: v for k, v in overrides.items() if v is not None}})
        # Only beam search (with or without sampling) reads it; transformers warns when it is set otherwise.
        if gen.get("num_beams", 1) == 1:
            gen.pop("length_penalty", None)
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            gen.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return gen

    @property
    def llm_context(self) -> int:
        """Positions the LLM takes (decoder-only: soft prompt + prompt + new tokens; T5: encoder input)."""
        self._need_llm()
        return llm_context(self.model.language_model.config, self.is_encoder_decoder)

    def check_prompts(
        self, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int | None = None
    ) -> list[int]:
        """Token counts of the LLM prompts; a `ValueError` naming the counts when one is over the cap
        (`max_prompt_tokens`, else `self.max_prompt_tokens`) or does not fit the LLM's context with the
        soft prompt and `max_new_tokens`. Tokenizes only: call it before any compute."""
        cap = self._cap(max_prompt_tokens)
        counts = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]] if prompts else []
        self._check_counts(counts, max_new_tokens, cap)
        return counts

    def _cap(self, max_prompt_tokens: int | None) -> int | None:
        """The call's cap, else the model's (an attribute users may set: checked here, on use)."""
        cap = self.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
        return check_max_prompt_tokens(cap)

    def _check_counts(self, counts: Sequence[int], max_new_tokens: int, cap: int | None) -> None:
        if not counts:
            return
        longest = max(range(len(counts)), key=counts.__getitem__)
        what = "prompt" if len(counts) == 1 else f"prompt {longest + 1} of {len(counts)}"
        queries, context, enc_dec = self.model.num_queries, self.llm_context, self.is_encoder_decoder
        check_prompt_length(counts[longest], queries, max_new_tokens, context, enc_dec, cap, what)

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def _generate(
        self, soft_prompts: torch.Tensor, prompts: list[str], gen: dict[str, Any], rows: torch.Tensor | None = None
    ) -> list[str]:
        """Generate for `prompts` after their soft prompts. `rows` (B,): the soft prompt of each prompt when
        `soft_prompts` (U, Q, H) holds only the distinct ones (many questions about one image: U = 1); a
        decoder-only LLM then computes each one's keys/values once and shares them across the batch and the
        beams (`CausalLanguageModel.generate_shared`); an encoder-decoder LLM gets them repeated."""
        gen = dict(gen)
        seed = gen.pop("seed", None)  # ours, not a transformers setting
        tokens = tokenize_prompts(self.tokenizer, prompts, left_pad=not self.is_encoder_decoder)
        # Callers that skip caption/ask (the eval runners) still get the clear error instead of an index error
        # past OPT's positions; the per-call cap is the caller's business, checked before its compute.
        self._check_counts(tokens.attention_mask.sum(1).tolist(), gen.get("max_new_tokens", 20), None)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        if rows is not None and not self.is_encoder_decoder:
            lm = self.model.lm
            return self._decode(self._seeded(seed, lambda: lm.generate_shared(soft_prompts, rows, ids, mask, **gen)))
        if rows is not None:
            soft_prompts = soft_prompts[rows]
        kwargs = dict(input_ids=ids, attention_mask=mask, soft_prompt=soft_prompts, **gen)
        return self._decode(self._seeded(seed, lambda: self.model.generate(**kwargs)))

    def _seeded(self, seed: int | None, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """run(), with the global RNG seeded when `seed` is given. A seeded call must not move the caller's
        global RNG: fork it, seed, run, restore."""
        if seed is None:
            return run()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return run()

    @torch.no_grad()
    def soft_prompts(self, feats: torch.Tensor, questions: Sequence[str] | None = None) -> torch.Tensor:
        """Image features (B, N, Dv) -> soft prompts (B, Q, H). Models whose Q-Former reads the instruction
        (`question_to_qformer`: InstructBLIP and ours) read `questions` here, one per row: the question, or the
        caption prompt ("" or None: no instruction). Up to the Q-Former's position table: transformers'
        InstructBLIP never cuts an instruction, so a shorter cut would change its answers."""
        if not self.model.config.question_to_qformer:
            return self.model.soft_prompt(feats)
        questions = list(questions) if questions is not None else [""] * feats.shape[0]
        longest = self.model.config.qformer.max_position_embeddings
        return self.model.soft_prompt(feats, self._qformer_text(questions, longest))

    @property
    def question_template(self) -> str:
        """How `ask` and `chat` put a question into the LLM prompt: the checkpoint's (InstructBLIP: "{}", the
        instruction as it is), else the LLM family's BLIP-2 template (REFERENCE §3)."""
        return self.model.config.question_template or vqa_template(self.is_encoder_decoder)

    def _soft_prompts(self, images: Sequence[ImageInput], questions: Sequence[str] | None = None) -> torch.Tensor:
        """Soft prompts for images, each encoded once; one image with several questions is expanded."""
        feats = self.encode_images(images)
        if questions is not None and feats.shape[0] == 1 and len(questions) > 1:
            feats = feats.expand(len(questions), -1, -1)
        return self.soft_prompts(feats, questions)

    # -- generation ---------------------------------------------------------------------------------------
    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | None = None,
        *,
        max_prompt_tokens: int | None = None,
        **generation: Any,
    ) -> list[str]:
        """One caption per image; with `prompt` ("a photo of"), the LLM continues it. `generation`: the
        settings of `blip2.inference.generation.SETTINGS`; a bad one or a prompt that does not fit
        (`max_prompt_tokens`, else `self.max_prompt_tokens`, else the LLM's context) is a ValueError."""
        self._need_llm()
        images = _as_list(images)
        gen = self._generation(CAPTION_DEFAULTS, generation)
        self.check_prompts([prompt or ""], gen["max_new_tokens"], max_prompt_tokens)
        out: list[str] = []
        for chunk in _chunks(images, self.batch_size):
            # The caption prompt is the instruction: a Q-Former that reads one reads it too (InstructBLIP).
            texts = [prompt or ""] * len(chunk)
            out += self._generate(self._soft_prompts(chunk, texts), texts, gen)
        return out

    def ask(
        self,
        images: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        template: str | None = None,
        *,
        max_prompt_tokens: int | None = None,
        **generation: Any,
    ) -> list[str]:
        """Answers. One image with many questions encodes the image once; otherwise images and questions pair
        up one to one. `template` defaults to the LLM family's ("Question: {} Answer:" / "... Short answer:").
        Every templated question is checked against the prompt cap and the context before anything runs."""
        self._need_llm()
        images, questions = _as_list(images), _as_list(questions)
        if len(images) != 1 and len(images) != len(questions):
            raise ValueError(f"got {len(images)} images and {len(questions)} questions: give one image, or one per question")
        template = template or self.question_template
        gen = self._generation(VQA_DEFAULTS, generation)
        prompts = [template.format(q) for q in questions]
        self.check_prompts(prompts, gen["max_new_tokens"], max_prompt_tokens)
        if len(images) == 1:
            feats = self.encode_images(images)  # once, whatever the number of questions
            # Without question_to_qformer the soft prompt does not depend on the question: compute it once, and
            # (decoder-only LLMs) its keys/values once per batch, shared by every question and beam.
            shared = None if self.model.config.question_to_qformer else self.soft_prompts(feats)  # (1, Q, H)
            out: list[str] = []
            for start in range(0, len(questions), self.batch_size):
                chunk = questions[start : start + self.batch_size]
                chunk_prompts = prompts[start : start + self.batch_size]
                if shared is not None:
                    rows = torch.zeros(len(chunk), dtype=torch.long, device=self.device)
                    out += self._generate(shared, chunk_prompts, gen, rows=rows)
                else:
                    out += self._generate(self.soft_prompts(feats.expand(len(chunk), -1, -1), chunk), chunk_prompts, gen)
            return out
        out = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            out += self._generate(self._soft_prompts(images[start:stop], questions[start:stop]), prompts[start:stop], gen)
        return out

    def chat(
        self, image: ImageInput, *, max_prompt_tokens: int | None = None, **generation: Any
    ) -> ChatSession:
        """A conversation about one image; the image is encoded here, once. Old turns are dropped to keep each
        prompt within `max_prompt_tokens` (else `self.max_prompt_tokens`) and the LLM's context."""
        self._need_llm()
        gen = self._generation(VQA_DEFAULTS, generation)  # a bad setting fails before the image is encoded
        cap = self._cap(max_prompt_tokens)
        return ChatSession(self, self.encode_images([image]), gen, max_prompt_tokens=cap)

    # -- matching and retrieval ---------------------------------------------------------------------------
    def _qformer_text(self, texts: Sequence[str], longest: int = QFORMER_MAX_TEXT):
        # Long texts are cut at `longest` tokens (retrieval's 35 by default), never past the position table.
        longest = min(longest, self.model.config.qformer.max_position_embeddings)
        tokens = tokenize_qformer(self.qformer_tokenizer, list(texts), longest)
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    @torch.no_grad()
    def itm(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]) -> list[float]:
        """Probability that each (image, text) pair matches (softmax of the ITM head). One image with many
        texts, many images with one text, or pairs one to one."""
        self._need_qformer_text()
        images, texts = _as_list(images), _as_list(texts)
        feats = self.encode_images(images)
        if len(images) == 1:
            feats = feats.expand(len(texts), -1, -1)
        elif len(texts) == 1:
            texts = texts * len(images)
        elif len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts: give one of either, or equal numbers")
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self._qformer_text(texts[start : start + self.batch_size])
            logits = self.model.itm_logits(feats[start : start + self.batch_size], ids, mask)
            out += logits.float().softmax(-1)[:, 1].tolist()
        return out

    @torch.no_grad()
    def _image_itc(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.model.image_itc_features(self.model.query(f).hidden) for f in feats.split(self.batch_size)]
        )  # (Bi, Q, E)

    @torch.no_grad()
    def _text_itc(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for chunk in _chunks(list(texts), self.batch_size * 8):
            ids, mask = self._qformer_text(chunk)
            out.append(self.model.text_itc_features(self.model.encode_text(ids, mask)))
        return torch.cat(out)  # (Bt, E)

    @torch.no_grad()
    def similarity(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]) -> torch.Tensor:
        """ITC scores (n_images, n_texts): cosine of the best query (REFERENCE §6), no temperature."""
        self._need_qformer_text()
        from blip2.models.losses import max_over_queries

        image = self._image_itc(self.encode_images(_as_list(images)))
        return max_over_queries(image, self._text_itc(_as_list(texts))).float().cpu()

    @torch.no_grad()
    def retrieve(
        self, texts: str | Sequence[str], images: Sequence[ImageInput], k: int = 10, rerank: int = RETRIEVAL_K
    ) -> list[list[Match]]:
        """For each text, the best `k` images: ITC top-`rerank`, then re-scored by ITM logit + ITC cosine
        (REFERENCE §6). Accepts precomputed image features (a tensor from `encode_images`) as `images`."""
        self._need_qformer_text()
        from blip2.models.losses import max_over_queries

        feats = images if isinstance(images, torch.Tensor) else self.encode_images(list(images))
        texts = _as_list(texts)
        itc = max_over_queries(self._image_itc(feats), self._text_itc(texts)).t()  # (Bt, Bi)
        top = min(rerank, feats.shape[0])
        results: list[list[Match]] = []
        for t, text in enumerate(texts):
            scores, idx = itc[t].topk(top)
            ids, mask = self._qformer_text([text])
            logits = torch.cat(
                [
                    self.model.itm_logits(feats[chunk], ids.expand(len(chunk), -1), mask.expand(len(chunk), -1))
                    for chunk in idx.split(self.batch_size)
                ]
            ).float()  # (top, 2)
            final = logits[:, 1] + scores.float()
            probs = logits.softmax(-1)[:, 1]
            order = final.argsort(descending=True)[:k]
            results.append([Match(int(idx[i]), float(final[i]), float(scores[i]), float(probs[i])) for i in order])
        return results

    @torch.no_grad()
    def features(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        texts: str | Sequence[str] | None = None,
        mode: str = "image",
    ) -> dict[str, torch.Tensor]:
        """Embeddings. mode "image": query outputs (B, Q, D) [+ normalised ITC features (B, Q, E)];
        "text": Q-Former text states (B, T, D) + [CLS] ITC feature (B, E); "multimodal": query outputs
        after reading both the image and the text (the ITM pass) (B, Q, D)."""
        if mode == "image":
            if images is None:
                raise ValueError("mode='image' needs images")
            hidden = self.model.query(self.encode_images(_as_list(images))).hidden
            out = {"image_embeds": hidden}
            if self.model.config.stage1_heads:
                out["image_features"] = self.model.image_itc_features(hidden)
            return out
        self._need_qformer_text()
        if texts is None:
            raise ValueError(f"mode={mode!r} needs texts")
        ids, mask = self._qformer_text(_as_list(texts))
        if mode == "text":
            hidden = self.model.encode_text(ids, mask)
            return {"text_embeds": hidden, "text_features": self.model.text_itc_features(hidden)}
        if mode == "multimodal":
            if images is None:
                raise ValueError("mode='multimodal' needs images")
            hidden = self.model.query_with_text(self.encode_images(_as_list(images)), ids, mask)
            return {"multimodal_embeds": hidden}
        raise ValueError(f"unknown mode {mode!r} (image, text, multimodal)")


@dataclass
class ChatSession:
    """A multi-turn conversation about one image. The image is encoded once (and its soft prompt computed once
    unless it reads the question); when the history outgrows the LLM's context (or `max_prompt_tokens`), the oldest turns are dropped (never the image) and a warning says
    so. A turn that cannot fit even alone is a ValueError naming the counts.

    Decoder-only LLMs keep the key/value cache of the conversation so far, soft prompt included, so a turn
    prefills only the tokens the cache does not hold: its prompt is tokenized whole as always, the cache is
    cropped to the longest common prefix of those ids and the ids it holds (a re-tokenized answer or a dropped
    turn simply shortens that prefix), and the rest is prefilled. After greedy or sampled turns the cache also
    holds the answer; after beam search it keeps the prompt only (every beam shares it; the beams' own rows were
    reordered by the search and need not be the chosen one's), and the next turn prefills the answer with its
    question, on one row that is then copied to the beams. With `compile_decode=True`, greedy and sampled turns keep
    a static cache instead (fast_decode.py: cropped by moving its length back, copied into a longer one when a turn
    outgrows it) and decode compiled. Tokens equal re-running the whole prompt (up to float rounding, as for generate's own decode
    steps; tests compare them). No cache is kept, every turn being one full pass as before, where nothing could
    be reused: an encoder-decoder LLM (T5 encodes the whole conversation bidirectionally), a model whose soft
    prompt reads the question (`question_to_qformer`: the prefix changes every turn), a sliding-window LLM."""

    owner: Blip2
    image_feats: torch.Tensor  # (1, N, Dv): encoded once for the whole conversation
    generation: dict[str, Any]
    history: list[tuple[str, str]] = field(default_factory=list)
    dropped_turns: int = 0
    max_prompt_tokens: int | None = None
    # The kept cache: keys/values of [soft prompt; held ids], and the last turn's soft prompt. Internal.
    _cache: Any = field(default=None, repr=False)
    _held: list[int] = field(default_factory=list, repr=False)
    _soft: torch.Tensor | None = field(default=None, repr=False)

    @property
    def keeps_cache(self) -> bool:
        """Whether turns reuse the conversation's key/value cache (see the class docstring)."""
        owner = self.owner
        if owner.is_encoder_decoder or owner.model.config.question_to_qformer:
            return False
        return kv_cache.can_keep(owner.model.language_model)

    @property
    def cached_tokens(self) -> int:
        """Positions (soft prompt included) the kept cache holds now; 0 when none is kept."""
        return int(self._cache.get_seq_length()) if self._cache is not None else 0  # a StaticCache's is a tensor

    def _fit(self, question: str) -> str:
        owner = self.owner
        template = owner.question_template
        max_new = self.generation.get("max_new_tokens", 20)  # 20: transformers' default when unset
        args = (owner.model.num_queries, max_new, owner.llm_context, owner.is_encoder_decoder)
        # A turn that cannot fit even alone is refused (with the counts) before it costs the conversation
        # its history; once it fits alone, dropping old turns always ends.
        alone = len(owner.tokenizer(chat_prompt([], question, template))["input_ids"])
        check_prompt_length(alone, *args, self.max_prompt_tokens, what="the question's prompt alone")
        budget = prompt_budget(*args, self.max_prompt_tokens)
        while True:
            prompt = chat_prompt(self.history, question, template)
            if len(owner.tokenizer(prompt)["input_ids"]) <= budget:
                return prompt
            self.history.pop(0)
            self.dropped_turns += 1
            warnings.warn(
                f"chat context full: dropped the oldest turn ({self.dropped_turns} dropped so far); the image is kept",
                stacklevel=3,
            )

    def ask(self, question: str) -> str:
        prompt = self._fit(question)
        # Models that feed the question to the Q-Former read this turn's question; the image is not re-encoded.
        # Other soft prompts depend on the image alone: computed on the first turn, then reused.
        if self.owner.model.config.question_to_qformer or self._soft is None:
            soft = self.owner.soft_prompts(self.image_feats, [question])
        else:
            soft = self._soft
        expand = kv_cache.rows_per_sequence(self.owner.model.language_model, self.generation) if self.keeps_cache else None
        if expand is None:
            self._cache, self._soft = None, soft
            answer = self.owner._generate(soft, [prompt], self.generation)[0]
        else:
            answer = self._ask_cached(soft, prompt, expand)
        self.history.append((question, answer))
        return answer

    @torch.no_grad()
    def _ask_cached(self, soft: torch.Tensor, prompt: str, expand: int) -> str:
        owner = self.owner
        lm = owner.model.lm
        gen = dict(self.generation)
        seed = gen.pop("seed", None)
        ids: list[int] = owner.tokenizer(prompt)["input_ids"]
        owner._check_counts([len(ids)], gen.get("max_new_tokens", 20), None)
        queries = soft.shape[1]
        cache, self._cache = self._cache, None  # a turn that fails midway leaves no half-updated cache behind
        if cache is None or self._soft is None or not torch.equal(soft, self._soft):
            cache, held = kv_cache.new_cache(lm.model), []  # first turn, or a new prefix: one full pass
        else:
            held = self._held
        # Keep the longest common prefix; at least one prompt token is left for generate to prefill.
        keep = min(kv_cache.common_prefix(held, ids), len(ids) - 1)
        if cache.get_seq_length() > 0:
            kv_cache.crop(cache, queries + keep)
        if expand > 1:
            # Beam search runs one cache row per beam, all with the same prompt: prefill it (but its last token,
            # which generate needs) on one row, then copy that row to every beam.
            first = lm.model.get_input_embeddings().weight.device
            if cache.get_seq_length() == 0:
                kv_cache.prefill(lm.model, cache, soft.to(first, lm.model.dtype))
            if keep < len(ids) - 1:
                kv_cache.prefill(lm.model, cache, lm.embed(torch.tensor([ids[keep:-1]], device=first)))
            cache.batch_repeat_interleave(expand)
        elif fast_decode.compiles(lm.model, gen):
            # The compiled decode (compile_decode=True) runs on a static cache: the kept one from the last turn when
            # this turn fits in it (cropping a static cache only moves its length back), else a bigger copy.
            cache = fast_decode.static_cache(lm.model, fast_decode.total_length(lm.model, gen, queries + len(ids)), cache)
        input_ids = torch.tensor([ids], dtype=torch.long, device=owner.device)  # (1, T)
        out = owner._seeded(seed, lambda: lm.generate(soft, input_ids, torch.ones_like(input_ids), cache=cache, **gen))
        if expand == 1:
            # The cache now holds [soft prompt; prompt; answer minus its last token] (the last one was never fed).
            held = (ids + out[0].tolist())[: int(cache.get_seq_length()) - queries]
        else:
            kv_cache.crop(cache, queries + len(ids))  # the prompt: identical in every beam's row
            cache.batch_select_indices(torch.zeros(1, dtype=torch.long))  # CPU indices: any layer's device
            held = ids
        self._cache, self._held, self._soft = cache, held, soft
        return owner._decode(out[:1])[0]

    def reset(self) -> None:
        """Forget the conversation (the image stays). The kept cache stays too: the next prompt's common prefix
        with it (the soft prompt at least) is still valid."""
        self.history.clear()


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")):
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        # transformers 5 skips the clean-up for BPE tokenizers anyway (it would strip real spaces before
        # punctuation) and warns when a config still asks for it, as SmolLM2's does: False decodes the same text.
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    quantize: str | None = None,
    compile_decode: bool = False,
) -> Blip2:
    """Load a BLIP-2 checkpoint: a local folder, a hub name (Salesforce/blip2-opt-2.7b), or "default".
    `max_prompt_tokens`: the prompt cap of every call (None: the LLM's context; the default model: 512).

    Tensors are read one at a time, cast to `dtype` and put on `device` as read: loading peaks near the
    model's own size. `device_map` ("auto", "balanced", "sequential" or {LLM module: device}, with
    `max_memory`/`offload_folder`) spreads the frozen LLM over GPUs, CPU memory and disk; `quantize`
    ("8bit"/"4bit", CUDA + bitsandbytes) loads the LLM quantized, the rest in `dtype` (default float16).
    `compile_decode`: greedy/sampled decoding on a static cache with a compiled forward (decoder-only LLMs;
    see `blip2.models.language.fast_decode.enable_compiled_decode`)."""
    from blip2.inference.registry import DEFAULT_MODEL_PROMPT_TOKENS, resolve_name

    if max_prompt_tokens is None and str(name_or_path) == "default":
        max_prompt_tokens = DEFAULT_MODEL_PROMPT_TOKENS
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(names)}")
        dtype = names[dtype]
    model, folder = load_model(resolve_name(name_or_path), device=device, dtype=dtype, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_folder, quantize=quantize)
    if compile_decode:
        if not hasattr(model, "language_model"):
            raise ValueError("compile_decode needs a model with a language model (a stage-2 checkpoint)")
        from blip2.models.language.fast_decode import enable_compiled_decode

        enable_compiled_decode(model.language_model)
    tokenizer = _load_tokenizer(folder)
    qformer_tokenizer = None
    if (folder / "qformer_tokenizer").is_dir():
        qformer_tokenizer = _load_tokenizer(folder / "qformer_tokenizer")
    elif model.config.language is None:
        tokenizer, qformer_tokenizer = None, tokenizer  # retrieval checkpoints ship the BERT tokenizer
    return Blip2(model, tokenizer, qformer_tokenizer, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
