"""Stage-2 text batches: (prompt, target) pairs -> LLM input ids, attention mask and labels (REFERENCE §3).

Decoder-only (OPT, Llama): ids = tokens(prompt, with the tokenizer's BOS) + tokens(target) [+ EOS], right
padded; labels are the ids with the prompt and the padding set to -100, so only the target (and its EOS)
is trained. The prompt and the target are tokenized separately and concatenated, so the mask is exact even
where a tokenizer would merge across the boundary (LAVIS instead tokenizes the joined string and masks
the prompt's token count). With an empty prompt nothing is masked: the BOS is then a target of the last
soft-prompt position, as in LAVIS, which masks the prompt only `if self.prompt` (REFERENCE §3).

Encoder-decoder (T5): the prompt (or a caption's prefix) goes to the encoder, the target (or the caption's
suffix) is the decoder's label sequence; both end with the tokenizer's EOS and are padded, pad -> -100.
Without a prompt, LAVIS's FlanT5 pretraining splits a caption at a random point between position 1 and
its middle (issue #139); we split at a word boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class LMBatch:
    input_ids: torch.Tensor  # (B, T) decoder-only: prompt + target; encoder-decoder: encoder input
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) decoder-only (prompt/pad = -100); (B, S) encoder-decoder target
    decoder_attention_mask: torch.Tensor | None = None  # (B, S) encoder-decoder only


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the LLM tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    return int(pad)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def decoder_only_batch(tokenizer, prompts: list[str], targets: list[str], max_length: int = 32,
                       append_eos: bool = True, eos_token_id: int | None = None) -> LMBatch:
    """Prompt + target for a causal LM; the prompt keeps the tokenizer's special tokens (its BOS), the target
    gets none except an optional EOS. Rows longer than `max_length` lose the end of their target."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    # The token generation stops at: the LLM's own (OPT in BLIP-2 stops at "\n", REFERENCE §3), else the tokenizer's.
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos needs a tokenizer with an EOS token")
    rows, masks = [], []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + ([eos] if append_eos else [])
        if len(p) >= max_length:
            raise ValueError(f"the prompt {prompt!r} is {len(p)} tokens, not shorter than max_length={max_length}")
        ids = (p + t)[:max_length]
        rows.append(ids)
        masks.append(len(p) if prompt else 0)
    pad = _pad_id(tokenizer)
    input_ids = _pad(rows, pad)
    attention = _pad([[1] * len(r) for r in rows], 0)
    labels = input_ids.clone()
    for i, prompt_len in enumerate(masks):
        labels[i, :prompt_len] = IGNORE
    labels[attention == 0] = IGNORE
    return LMBatch(input_ids, attention, labels)


def encoder_decoder_batch(tokenizer, inputs: list[str], targets: list[str], max_length: int = 32) -> LMBatch:
    """Encoder text and decoder target, each tokenized with the tokenizer's specials (T5: ... </s>)."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    pad = _pad_id(tokenizer)
    enc = [tokenizer(x, truncation=True, max_length=max_length)["input_ids"] for x in inputs]
    dec = [tokenizer(y, truncation=True, max_length=max_length)["input_ids"] for y in targets]
    input_ids = _pad(enc, pad)
    attention = _pad([[1] * len(r) for r in enc], 0)
    dec_ids = _pad(dec, pad)
    dec_mask = _pad([[1] * len(r) for r in dec], 0)
    labels = dec_ids.masked_fill(dec_mask == 0, IGNORE)
    return LMBatch(input_ids, attention, labels, dec_mask)


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """(prefix, suffix) at a random word boundary in [1, middle] (LAVIS FlanT5 prefix LM, issue #139).
    One-word captions get an empty prefix."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    cut = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:cut]), " ".join(words[cut:])
