"""Tokenizers and prompt templates: text in, tensors out (DESIGN §2: nothing tokenizes inside forward)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# REFERENCE §3: the paper's zero-shot VQA prompts.
VQA_TEMPLATE_DECODER = "Question: {} Answer:"
VQA_TEMPLATE_T5 = "Question: {} Short answer:"
DEC_TOKEN = "[DEC]"
QFORMER_MAX_TEXT = 35  # retrieval evaluation length (REFERENCE §1)


def vqa_template(is_encoder_decoder: bool) -> str:
    return VQA_TEMPLATE_T5 if is_encoder_decoder else VQA_TEMPLATE_DECODER


def chat_prompt(history: Sequence[tuple[str, str]], question: str, template: str = VQA_TEMPLATE_DECODER) -> str:
    """LAVIS-style multi-turn prompt (REFERENCE §6): 'Question: q Answer: a.' pairs, then the new question.
    Training (stage 2 on VQA records with a `history`) and `Blip2.chat` build prompts with this one function."""
    turns = [f"{template.format(q)} {a}." for q, a in history]
    turns.append(template.format(question))
    return " ".join(turns)


@dataclass
class Tokens:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)


def tokenize_prompts(tokenizer, texts: list[str], left_pad: bool, max_length: int | None = None) -> Tokens:
    """LLM prompts. Decoder-only LLMs get left padding so every row ends at its last real token."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if left_pad else "right"
    try:
        enc = tokenizer(
            texts, return_tensors="pt", padding="longest", truncation=max_length is not None, max_length=max_length
        )
    finally:
        tokenizer.padding_side = side
    return Tokens(enc["input_ids"], enc["attention_mask"])


def tokenize_qformer(tokenizer, texts: list[str], max_length: int = QFORMER_MAX_TEXT) -> Tokens:
    """Q-Former text ([CLS] ... [SEP]), right padded and truncated (REFERENCE §1)."""
    enc = tokenizer(texts, return_tensors="pt", padding="longest", truncation=True, max_length=max_length)
    return Tokens(enc["input_ids"], enc["attention_mask"])


def dec_token_id(tokenizer) -> int:
    """The id of [DEC], the ITG start token BLIP-2 adds to BERT's vocabulary (REFERENCE §1)."""
    token_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        if tokenizer.bos_token_id is not None:
            return int(tokenizer.bos_token_id)
        raise ValueError(f"the Q-Former tokenizer has no {DEC_TOKEN} token; add it with add_special_tokens")
    return int(token_id)
