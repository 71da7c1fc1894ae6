"""transformers' InstructBLIP state-dict layout <-> ours, as one declarative table.

InstructBLIP (Dai et al. 2023) is BLIP-2 with an instruction-aware Q-Former: the instruction's tokens join the
queries in self-attention (both ways) and only the queries' outputs reach the LLM. That is our
`question_to_qformer` model (`Blip2Model.query_with_text`), so the weights are the same tensors; only the
Q-Former's text side lives elsewhere. transformers' `InstructBlipQFormerModel` keeps the word/position
embeddings and the LayerNorm over [queries; text] in `qformer.embeddings.*`; our names follow its BLIP-2
classes, which keep the embeddings at the top level (`embeddings.*`, as `Blip2ForImageTextRetrieval`) and the
LayerNorm as `qformer.layernorm`. The vision tower (InstructBlipVisionModel = Blip2VisionModel), the queries,
the Q-Former layers, the projection and the LLM have the same names in both.

Side a is transformers' InstructBLIP, side b ours:

    ours = convert(instructblip_sd, RULES)          # what `load_model` does with an "instructblip" folder
    theirs = convert(ours, reverse(RULES))          # what `save_model` writes for a question_to_qformer model

Strict (keymap.py): an unknown key or a missing Q-Former key is a KeyMapError naming them all. The frozen
tower and LLM are matched whole (`{*}`): a checkpoint whose frozen parts come from elsewhere stores none of
them, and their own names are checked when the model loads them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from blip2.convert.hf import INSTRUCTBLIP_TYPE, uses_instructblip_layout
from blip2.convert.keymap import Rule, convert, rename, reverse
from blip2.models.config import Blip2Config

StateDict = dict[str, torch.Tensor]
_WB = ("weight", "bias")
_LAYER = "qformer.encoder.layer.{}"
# A buffer (arange of the position table) that transformers < 4.31 wrote into InstructBLIP checkpoints; both
# sides re-derive it, so it is dropped on the way in and never written.
POSITION_IDS = "qformer.embeddings.position_ids"
# Groups a checkpoint of a question_to_qformer model with an LLM always holds (the frozen parts may come
# from elsewhere: `pretrained` in their configs).
REQUIRED_GROUPS = ("queries", "qformer", "qformer_text", "language_projection")


def _same(name: str, group: str, names: tuple[str, ...] = _WB, optional: bool = False) -> list[Rule]:
    return [rename(f"{name}.{n}", f"{name}.{n}", group, optional) for n in names]


def _attention(name: str, optional: bool = False) -> list[Rule]:
    base = f"{_LAYER}.{name}"
    parts = ("attention.query", "attention.key", "attention.value", "output.dense", "output.LayerNorm")
    return [r for part in parts for r in _same(f"{base}.{part}", "qformer", optional=optional)]


def _ffn(suffix: str, group: str) -> list[Rule]:  # suffix "_query" (query FFN) or "" (instruction FFN)
    names = (f"intermediate{suffix}.dense", f"output{suffix}.dense", f"output{suffix}.LayerNorm")
    return [r for n in names for r in _same(f"{_LAYER}.{n}", group)]


def _rules() -> tuple[Rule, ...]:
    emb = "qformer.embeddings"
    return (
        rename("query_tokens", "query_tokens", "queries"),
        # The only renames: the Q-Former's text embeddings and its input LayerNorm over [queries; text].
        rename(f"{emb}.word_embeddings.weight", "embeddings.word_embeddings.weight", "qformer_text"),
        rename(f"{emb}.position_embeddings.weight", "embeddings.position_embeddings.weight", "qformer_text"),
        *[rename(f"{emb}.layernorm.{n}", f"qformer.layernorm.{n}", "qformer") for n in _WB],
        *_attention("attention"),
        *_attention("crossattention", optional=True),  # every k-th layer only (REFERENCE §1): all-or-none
        *_ffn("_query", "qformer"),
        *_ffn("", "qformer_text"),
        *_same("language_projection", "language_projection"),
        rename("vision_model.{*}", "vision_model.{*}", "vision"),
        rename("language_model.{*}", "language_model.{*}", "language_model"),
        # Our stage-1 parts, which transformers' InstructBLIP lacks: kept under their own names (DESIGN §4,
        # "clearly named extra keys"); transformers reports them as unexpected and ignores them.
        *[r for head in ("vision_projection", "text_projection", "itm_head") for r in _same(head, "heads", optional=True)],
        rename("temp", "temp", "heads", optional=True),
        *_same("qformer_lm_head.transform.dense", "heads", optional=True),
        *_same("qformer_lm_head.transform.LayerNorm", "heads", optional=True),
        rename("qformer_lm_head.bias", "qformer_lm_head.bias", "heads", optional=True),
    )


RULES = _rules()


def instructblip_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A transformers InstructBLIP state dict (or one we saved in its layout) in our names."""
    return convert({k: v for k, v in sd.items() if k != POSITION_IDS}, RULES, REQUIRED_GROUPS)


def ours_to_instructblip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict of a question_to_qformer model in transformers' InstructBLIP names; the inverse of
    `instructblip_to_ours`, tensor for tensor."""
    return convert(sd, reverse(RULES), REQUIRED_GROUPS)


# ---- the hooks `load_model` / `save_model` call: the layout follows config.json's model_type ----


def state_from_folder(hf_config: Mapping[str, object], sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The tensors of a checkpoint folder in our names: converted when its config.json says "instructblip"."""
    return instructblip_to_ours(sd) if hf_config.get("model_type") == INSTRUCTBLIP_TYPE else dict(sd)


def state_for_folder(cfg: Blip2Config, sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our tensors in the names `config_to_hf(cfg)` announces: InstructBLIP's for question_to_qformer models."""
    return ours_to_instructblip(sd) if uses_instructblip_layout(cfg) else dict(sd)


def processor_class(cfg: Blip2Config) -> str:
    """processor_config.json's class: transformers' InstructBLIP processor also tokenizes for the Q-Former."""
    return "InstructBlipProcessor" if uses_instructblip_layout(cfg) else "Blip2Processor"
