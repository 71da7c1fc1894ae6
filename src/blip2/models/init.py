"""Initialising a Q-Former from a BERT checkpoint, as BLIP-2 does (REFERENCE §1).

Embeddings, self-attention and the text FFN come from BERT; the query FFN (`*_query`) is a copy of the text
FFN; cross-attention and the stage-1 heads stay randomly initialised. The word embeddings grow by the
tokens added to BERT's tokenizer ([DEC]). BERT's token-type embedding (type 0 for every token) is folded
into the position embeddings, so the Q-Former's text encoder computes exactly what BERT computes.
"""

from __future__ import annotations

import re

import torch

from blip2.models.blip2 import Blip2Model

_BERT_TO_OURS = [  # (BERT key regex, our key template)
    (r"embeddings\.LayerNorm\.(weight|bias)", "qformer.layernorm.{0}"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
     "qformer.encoder.layer.{0}.attention.attention.{1}.{2}"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.(dense|LayerNorm)\.(weight|bias)",
     "qformer.encoder.layer.{0}.attention.output.{1}.{2}"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", "qformer.encoder.layer.{0}.intermediate.dense.{1}"),
    (r"encoder\.layer\.(\d+)\.output\.(dense|LayerNorm)\.(weight|bias)", "qformer.encoder.layer.{0}.output.{1}.{2}"),
]
_IGNORED = re.compile(r"(pooler\.|embeddings\.position_ids|embeddings\.(word|position|token_type)_embeddings)")


def bert_to_qformer_state(bert: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """BertModel state dict -> our keys (text side + query FFN copies). `vocab_size` >= BERT's: new rows
    (added tokens such as [DEC]) get N(0, 0.02)."""
    bert = {k.removeprefix("bert."): v for k, v in bert.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in bert.items():
        for pattern, template in _BERT_TO_OURS:
            if m := re.fullmatch(pattern, key):
                out[template.format(*m.groups())] = value
                break
        else:
            if not _IGNORED.match(key):
                raise KeyError(f"unexpected BERT key {key!r}")
    for key in list(out):  # REFERENCE §1: every `_query` parameter starts as its text twin
        if m := re.fullmatch(r"(qformer\.encoder\.layer\.\d+\.)(intermediate|output)(\..+)", key):
            out[f"{m.group(1)}{m.group(2)}_query{m.group(3)}"] = out[key].clone()
    words = bert["embeddings.word_embeddings.weight"]
    if vocab_size < words.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} is smaller than BERT's {words.shape[0]}")
    extra = torch.randn(vocab_size - words.shape[0], words.shape[1]) * 0.02
    out["embeddings.word_embeddings.weight"] = torch.cat([words, extra])
    positions = bert["embeddings.position_embeddings.weight"]
    token_type = bert.get("embeddings.token_type_embeddings.weight")
    out["embeddings.position_embeddings.weight"] = positions + (token_type[0] if token_type is not None else 0)
    return out


@torch.no_grad()
def init_qformer_from_bert(model: Blip2Model, bert: dict[str, torch.Tensor]) -> list[str]:
    """Copy BERT weights into `model` (shapes must match); returns the keys that stay random."""
    state = bert_to_qformer_state(bert, model.config.qformer.vocab_size)
    own = model.state_dict()
    max_pos = own["embeddings.position_embeddings.weight"].shape[0]
    state["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"][:max_pos]
    for key, value in state.items():
        if key not in own:
            raise KeyError(f"{key} is not in the model: is the Q-Former built with use_text_input=True?")
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: BERT has shape {tuple(value.shape)}, the Q-Former {tuple(own[key].shape)}")
        own[key].copy_(value)
    return sorted(k for k in own if k not in state and not k.startswith(("vision_model.", "language_model.")))
