"""LAVIS <-> our state-dict layout (REFERENCE §8), as one declarative table per LAVIS model kind.

Our layout is transformers' `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval` names, plus
the stage-1 parts transformers lacks: `temp` and the Q-Former LM head `qformer_lm_head.*` (LAVIS
`Qformer.cls.predictions.*`, used by ITG, REFERENCE §2).

Kinds: "blip2" (stage 1 / image-text matching), "blip2_opt", "blip2_t5" (stage 2; LAVIS deletes the
Q-Former's text side and `cls` there, REFERENCE §1 "HF text-side modules").

Groups (for reporting and for `require_frozen`): vision, ln_vision, qformer, qformer_text, lm_head, heads,
language_projection, language_model. Released LAVIS .pth files usually lack the frozen groups
(`vision`, `language_model`): pass `require_frozen=False` and load those from their own weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, cast, get_args

import torch

from blip2.convert.keymap import KeyMapError, Rule, convert, groups_present, rename, reverse

LavisKind = Literal["blip2", "blip2_opt", "blip2_t5"]
KINDS: tuple[LavisKind, ...] = get_args(LavisKind)
FROZEN_GROUPS = frozenset({"vision", "language_model"})
BERT_MAX_POSITIONS = 512  # REFERENCE §1: absolute position embeddings, max 512

StateDict = dict[str, torch.Tensor]
_WB = ("weight", "bias")


def _renames(a: str, b: str, group: str, names: tuple[str, ...] = _WB, optional: bool = False) -> list[Rule]:
    return [rename(f"{a}.{n}", f"{b}.{n}", group, optional) for n in names]


# ---- the few non-renames (REFERENCE §8), each a pair of transforms ----


def _merge_qkv_bias(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # EVA has no k bias (fixed at 0); transformers stores one (3D,) bias, REFERENCE §8.
    return (torch.cat((q, torch.zeros_like(v), v)),)


def _split_qkv_bias(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = qkv.chunk(3)
    if torch.count_nonzero(k):  # transformers trains the k-third; EVA cannot represent it
        raise ValueError("the k-third of the qkv bias is non-zero; EVA (LAVIS) has no k bias")
    return q.clone(), v.clone()


def _untie(kept: torch.Tensor, tied_copy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # LAVIS ties cls.predictions.decoder.weight to the word embeddings and decoder.bias to
    # predictions.bias (BERT); the state dict stores each twice. We store one, so both must agree.
    if kept.shape != tied_copy.shape or not torch.equal(kept, tied_copy):
        raise ValueError("tied tensors differ; untied weights cannot be represented in our layout")
    return (kept,)


def _tie(kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return kept, kept  # the same tensor twice, as LAVIS's tied parameters are


def _check_position_ids(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # A BERT buffer, arange(max_positions); transformers re-creates it (non-persistent), so we drop it.
    if ids.dim() != 2 or not torch.equal(ids.long(), torch.arange(ids.shape[-1]).expand(1, -1)):
        raise ValueError("expected arange(n) of shape (1, n)")
    return ()


def _position_ids(max_positions: int) -> Rule:
    def make() -> tuple[torch.Tensor, ...]:
        return (torch.arange(max_positions).expand(1, -1),)  # int64 (1, max_positions), as BERT's buffer

    # optional: it carries no information, so a checkpoint stripped of it is still accepted.
    ids = "Qformer.bert.embeddings.position_ids"
    return Rule((ids,), (), "qformer", _check_position_ids, make, optional=True)


# ---- the tables ----


def _vision_rules() -> list[Rule]:
    ve, vm = "visual_encoder", "vision_model"
    blk, lay = f"{ve}.blocks.{{}}", f"{vm}.encoder.layers.{{}}"
    return [
        rename(f"{ve}.cls_token", f"{vm}.embeddings.class_embedding", "vision"),  # both (1, 1, D)
        rename(f"{ve}.pos_embed", f"{vm}.embeddings.position_embedding", "vision"),  # both (1, N, D)
        *_renames(f"{ve}.patch_embed.proj", f"{vm}.embeddings.patch_embedding", "vision"),
        *_renames(f"{blk}.norm1", f"{lay}.layer_norm1", "vision"),
        rename(f"{blk}.attn.qkv.weight", f"{lay}.self_attn.qkv.weight", "vision"),
        Rule((f"{blk}.attn.q_bias", f"{blk}.attn.v_bias"), (f"{lay}.self_attn.qkv.bias",), "vision",
             _merge_qkv_bias, _split_qkv_bias),
        *_renames(f"{blk}.attn.proj", f"{lay}.self_attn.projection", "vision"),
        *_renames(f"{blk}.norm2", f"{lay}.layer_norm2", "vision"),
        *_renames(f"{blk}.mlp.fc1", f"{lay}.mlp.fc1", "vision"),
        *_renames(f"{blk}.mlp.fc2", f"{lay}.mlp.fc2", "vision"),
        # Trainable LN on the frozen ViT output (REFERENCE §1): not part of the frozen group.
        *_renames("ln_vision", f"{vm}.post_layernorm", "ln_vision"),
    ]


_QL, _OL = "Qformer.bert.encoder.layer.{}", "qformer.encoder.layer.{}"


def _attention(lavis: str, ours: str, group: str, optional: bool = False) -> list[Rule]:
    # BertAttention: `self` -> `attention` (REFERENCE §8 "attention.self"), `output` unchanged.
    pairs = [(f"self.{n}", f"attention.{n}") for n in ("query", "key", "value")]
    pairs += [("output.dense", "output.dense"), ("output.LayerNorm", "output.LayerNorm")]
    return [
        r for a, b in pairs
        for r in _renames(f"{_QL}.{lavis}.{a}", f"{_OL}.{ours}.{b}", group, optional=optional)
    ]


def _ffn(name: str, group: str) -> list[Rule]:  # name: "" (text FFN) or "_query" (query FFN)
    return [
        *_renames(f"{_QL}.intermediate{name}.dense", f"{_OL}.intermediate{name}.dense", group),
        *_renames(f"{_QL}.output{name}.dense", f"{_OL}.output{name}.dense", group),
        *_renames(f"{_QL}.output{name}.LayerNorm", f"{_OL}.output{name}.LayerNorm", group),
    ]


def _qformer_rules(max_positions: int) -> list[Rule]:
    """The query path, present in every kind."""
    return [
        rename("query_tokens", "query_tokens", "qformer"),
        # transformers applies this LN to [queries; text] inside the Q-Former, REFERENCE §1 "Embeddings".
        *_renames("Qformer.bert.embeddings.LayerNorm", "qformer.layernorm", "qformer"),
        _position_ids(max_positions),
        *_attention("attention", "attention", "qformer"),
        # Only every k-th layer has cross-attention (REFERENCE §1): all-or-none per layer.
        *_attention("crossattention", "crossattention", "qformer", optional=True),
        *_ffn("_query", "qformer"),
    ]


def _stage1_rules() -> list[Rule]:
    emb, cls = "Qformer.bert.embeddings", "Qformer.cls.predictions"
    return [
        Rule((f"{emb}.word_embeddings.weight", f"{cls}.decoder.weight"),
             ("embeddings.word_embeddings.weight",), "qformer_text", _untie, _tie),
        rename(f"{emb}.position_embeddings.weight", "embeddings.position_embeddings.weight", "qformer_text"),
        *_ffn("", "qformer_text"),
        *_renames(f"{cls}.transform.dense", "qformer_lm_head.transform.dense", "lm_head"),
        *_renames(f"{cls}.transform.LayerNorm", "qformer_lm_head.transform.LayerNorm", "lm_head"),
        Rule((f"{cls}.bias", f"{cls}.decoder.bias"), ("qformer_lm_head.bias",), "lm_head", _untie, _tie),
        *_renames("vision_proj", "vision_projection", "heads"),
        *_renames("text_proj", "text_projection", "heads"),
        *_renames("itm_head", "itm_head", "heads"),
        rename("temp", "temp", "heads"),  # ITC temperature, a scalar (REFERENCE §2)
    ]


def _stage2_rules(llm: str) -> list[Rule]:  # llm: "opt" or "t5"
    return [
        *_renames(f"{llm}_proj", "language_projection", "language_projection"),
        # The LLM is an ordinary transformers model in both layouts; only the prefix differs.
        rename(f"{llm}_model.{{*}}", "language_model.{*}", "language_model"),
    ]


def lavis_rules(kind: LavisKind, max_position_embeddings: int = BERT_MAX_POSITIONS) -> tuple[Rule, ...]:
    """The table for one kind, LAVIS (side a) -> ours (side b). `max_position_embeddings` only sizes the
    `position_ids` buffer re-created on export."""
    if kind not in KINDS:
        raise ValueError(f"unknown LAVIS kind {kind!r}; expected one of {', '.join(KINDS)}")
    rules = _vision_rules() + _qformer_rules(max_position_embeddings)
    rules += _stage1_rules() if kind == "blip2" else _stage2_rules(kind.removeprefix("blip2_"))
    return tuple(rules)


def _required(rules: tuple[Rule, ...], require_frozen: bool) -> set[str]:
    return {r.group for r in rules} - (set() if require_frozen else FROZEN_GROUPS)


def lavis_to_ours(
    sd: Mapping[str, torch.Tensor], kind: LavisKind, *, require_frozen: bool = True
) -> StateDict:
    """A LAVIS state dict of `kind` in our layout. Strict: unknown keys and missing keys raise KeyMapError.
    `require_frozen=False` accepts a checkpoint without the frozen ViT / LLM (as LAVIS releases them)."""
    rules = lavis_rules(kind)
    return convert(sd, rules, _required(rules, require_frozen))


def ours_to_lavis(
    sd: Mapping[str, torch.Tensor],
    kind: LavisKind,
    *,
    require_frozen: bool = True,
    max_position_embeddings: int | None = None,
) -> StateDict:
    """Our state dict back in LAVIS layout; inverse of `lavis_to_ours`, bit-identical on a round trip.
    `max_position_embeddings` sizes LAVIS's `position_ids` buffer; by default the text position
    embedding's length, or BERT's 512 for stage 2 where LAVIS keeps only the buffer."""
    if max_position_embeddings is None:
        pos = sd.get("embeddings.position_embeddings.weight")
        max_position_embeddings = pos.shape[0] if pos is not None else BERT_MAX_POSITIONS
    rules = lavis_rules(kind, max_position_embeddings)
    return convert(sd, reverse(rules), _required(rules, require_frozen))


def lavis_groups(sd: Mapping[str, torch.Tensor], kind: LavisKind) -> set[str]:
    """Which groups a LAVIS state dict holds, e.g. to say that the frozen ViT must come from elsewhere."""
    return groups_present(sd, lavis_rules(kind))


def ours_groups(sd: Mapping[str, torch.Tensor], kind: LavisKind) -> set[str]:
    return groups_present(sd, reverse(lavis_rules(kind)))


def detect_kind(sd: Mapping[str, torch.Tensor]) -> LavisKind:
    """The LAVIS kind from its keys: the stage-2 projection names the LLM; `Qformer.*` alone is stage 1."""
    firsts = {k.split(".", 1)[0] for k in sd}
    opt, t5 = bool(firsts & {"opt_proj", "opt_model"}), bool(firsts & {"t5_proj", "t5_model"})
    if opt and t5:
        raise KeyMapError("state dict has both OPT and T5 keys (opt_*, t5_*); not one LAVIS BLIP-2 model")
    if opt or t5:
        return "blip2_opt" if opt else "blip2_t5"
    if "Qformer" in firsts:
        return "blip2"
    raise KeyMapError(
        f"not a LAVIS BLIP-2 state dict: no Qformer.*, opt_proj or t5_proj key (top-level names: "
        f"{', '.join(sorted(firsts)[:10])})"
    )


def load_lavis_checkpoint(path: str | os.PathLike[str]) -> tuple[StateDict, LavisKind]:
    """Read a LAVIS .pth (tensors only, weights_only=True) -> (state dict in LAVIS layout, kind).
    LAVIS wraps the state dict as {"model": ...} (plus optimizer/config/epoch in training checkpoints)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LAVIS checkpoint not found: {os.fspath(path)!r}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"{os.fspath(path)!r} is not a LAVIS checkpoint: expected a dict of tensors under 'model'"
        )
    sd = cast(StateDict, sd)
    return sd, detect_kind(sd)
