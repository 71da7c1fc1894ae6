"""LAVIS <-> our layout: round trips, parity with transformers' key names and shapes, strictness, loading.

The synthetic LAVIS state dicts below are written out from LAVIS's modules (eva_vit.py, Qformer.py,
blip2_qformer.py, blip2_opt.py, blip2_t5.py), not derived from our tables, so the tests check the tables.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from blip2.convert.keymap import KeyMapError, convert, rename, reverse
from blip2.convert.lavis import (
    detect_kind,
    lavis_groups,
    lavis_to_ours,
    load_lavis_checkpoint,
    ours_groups,
    ours_to_lavis,
)

# Tiny dims. The vision width differs from the Q-Former width so that a cross-attention key/value
# (Q, V) or a projection mixed up with its transpose shows as a shape mismatch against transformers.
V, V_FFN, V_LAYERS, PATCH, IMAGE = 40, 37, 2, 6, 30
N_TOKENS = (IMAGE // PATCH) ** 2 + 1
Q, Q_FFN, Q_LAYERS, N_QUERY, VOCAB, MAX_POS, EMBED = 32, 37, 2, 4, 50, 20, 16
OPT_CFG = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, ffn_dim=20, num_attention_heads=2,
               max_position_embeddings=40, word_embed_proj_dim=16)
T5_CFG = dict(vocab_size=60, d_model=16, d_kv=4, d_ff=20, num_layers=1, num_heads=2,
              dense_act_fn="gelu", is_gated_act=True)  # REFERENCE §3: LAVIS's gelu override
OURS_EXTRAS = {"temp", "qformer_lm_head.bias", *(f"qformer_lm_head.transform.{m}.{p}"
               for m in ("dense", "LayerNorm") for p in ("weight", "bias"))}


def _lin(sd: dict, name: str, out: int, inp: int) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.randn(out, inp), torch.randn(out)


def _ln(sd: dict, name: str, dim: int) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.randn(dim), torch.randn(dim)


def lavis_state_dict(kind: str, cross_freq: int, seed: int = 0, frozen: bool = True) -> dict:
    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if frozen:  # EVA ViT (eva_vit.py); frozen in fp16 (REFERENCE §4), so dtypes are mixed
        ve = "visual_encoder"
        sd[f"{ve}.cls_token"] = torch.randn(1, 1, V).half()
        sd[f"{ve}.pos_embed"] = torch.randn(1, N_TOKENS, V).half()
        sd[f"{ve}.patch_embed.proj.weight"] = torch.randn(V, 3, PATCH, PATCH).half()
        sd[f"{ve}.patch_embed.proj.bias"] = torch.randn(V).half()
        for i in range(V_LAYERS):
            b = f"{ve}.blocks.{i}"
            _ln(sd, f"{b}.norm1", V)
            sd[f"{b}.attn.qkv.weight"] = torch.randn(3 * V, V)
            sd[f"{b}.attn.q_bias"], sd[f"{b}.attn.v_bias"] = torch.randn(V), torch.randn(V)
            _lin(sd, f"{b}.attn.proj", V, V)
            _ln(sd, f"{b}.norm2", V)
            _lin(sd, f"{b}.mlp.fc1", V_FFN, V)
            _lin(sd, f"{b}.mlp.fc2", V, V_FFN)
            for k in list(sd):
                if k.startswith(b):
                    sd[k] = sd[k].half()
    _ln(sd, "ln_vision", V)
    sd["query_tokens"] = torch.randn(1, N_QUERY, Q)
    emb, stage1 = "Qformer.bert.embeddings", kind == "blip2"
    if stage1:  # blip2_opt / blip2_t5 set these to None (REFERENCE §1)
        sd[f"{emb}.word_embeddings.weight"] = torch.randn(VOCAB, Q)
        sd[f"{emb}.position_embeddings.weight"] = torch.randn(MAX_POS, Q)
    _ln(sd, f"{emb}.LayerNorm", Q)
    sd[f"{emb}.position_ids"] = torch.arange(MAX_POS).expand((1, -1))
    for i in range(Q_LAYERS):
        layer = f"Qformer.bert.encoder.layer.{i}"
        attns = ["attention"] + (["crossattention"] if i % cross_freq == 0 else [])
        for att in attns:
            kv_in = V if att == "crossattention" else Q
            _lin(sd, f"{layer}.{att}.self.query", Q, Q)
            _lin(sd, f"{layer}.{att}.self.key", Q, kv_in)
            _lin(sd, f"{layer}.{att}.self.value", Q, kv_in)
            _lin(sd, f"{layer}.{att}.output.dense", Q, Q)
            _ln(sd, f"{layer}.{att}.output.LayerNorm", Q)
        for ffn in ["_query"] + ([""] if stage1 else []):
            _lin(sd, f"{layer}.intermediate{ffn}.dense", Q_FFN, Q)
            _lin(sd, f"{layer}.output{ffn}.dense", Q, Q_FFN)
            _ln(sd, f"{layer}.output{ffn}.LayerNorm", Q)
    if stage1:
        cls = "Qformer.cls.predictions"
        sd[f"{cls}.bias"] = torch.randn(VOCAB)
        _lin(sd, f"{cls}.transform.dense", Q, Q)
        _ln(sd, f"{cls}.transform.LayerNorm", Q)
        sd[f"{cls}.decoder.weight"] = sd[f"{emb}.word_embeddings.weight"]  # tied (BertLMHeadModel)
        sd[f"{cls}.decoder.bias"] = sd[f"{cls}.bias"]  # decoder.bias = self.bias
        _lin(sd, "vision_proj", EMBED, Q)
        _lin(sd, "text_proj", EMBED, Q)
        _lin(sd, "itm_head", 2, Q)
        sd["temp"] = torch.tensor(0.07)
    else:
        llm = kind.removeprefix("blip2_")
        if llm == "opt":
            _lin(sd, "opt_proj", OPT_CFG["hidden_size"], Q)
            lm = OPTForCausalLM(OPTConfig(**OPT_CFG))
        else:
            _lin(sd, "t5_proj", T5_CFG["d_model"], Q)
            lm = T5ForConditionalGeneration(T5Config(**T5_CFG))
        if frozen:  # LAVIS's opt_model / t5_model are plain transformers models
            sd.update({f"{llm}_model.{k}": v.half() for k, v in lm.state_dict().items()})
    return sd


def hf_model(kind: str, cross_freq: int) -> torch.nn.Module:
    vision = Blip2VisionConfig(hidden_size=V, intermediate_size=V_FFN, num_hidden_layers=V_LAYERS,
                               num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
    qformer = Blip2QFormerConfig(hidden_size=Q, num_hidden_layers=Q_LAYERS, num_attention_heads=4,
                                 intermediate_size=Q_FFN, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                                 encoder_hidden_size=V, cross_attention_frequency=cross_freq,
                                 use_qformer_text_input=kind == "blip2")
    kw = dict(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=N_QUERY)
    if kind == "blip2":
        return Blip2ForImageTextRetrieval(Blip2Config(**kw, image_text_hidden_size=EMBED))
    text = OPTConfig(**OPT_CFG) if kind == "blip2_opt" else T5Config(**T5_CFG)
    return Blip2ForConditionalGeneration(Blip2Config(**kw, text_config=text.to_dict()))


KINDS = ["blip2", "blip2_opt", "blip2_t5"]
CASES = [(k, f) for k in KINDS for f in (1, 2)]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind,cross_freq", CASES)
def test_round_trip_is_bit_identical(kind: str, cross_freq: int) -> None:
    lavis = lavis_state_dict(kind, cross_freq)
    ours = lavis_to_ours(lavis, kind)
    assert "vision_model.encoder.layers.0.self_attn.qkv.bias" in ours
    assert not any("position_ids" in k or "decoder" in k for k in ours if not k.startswith("language_model"))
    assert_identical(ours_to_lavis(ours, kind, max_position_embeddings=MAX_POS), lavis)


def test_round_trip_without_frozen_parts_and_default_positions() -> None:
    lavis = lavis_state_dict("blip2", 2, frozen=False)  # as LAVIS releases checkpoints (REFERENCE §8)
    with pytest.raises(KeyMapError, match="group 'vision'"):
        lavis_to_ours(lavis, "blip2")
    ours = lavis_to_ours(lavis, "blip2", require_frozen=False)
    assert lavis_groups(lavis, "blip2") == ours_groups(ours, "blip2") == {
        "ln_vision", "qformer", "qformer_text", "lm_head", "heads"}
    # position_ids length comes from the text position embeddings when not given
    assert_identical(ours_to_lavis(ours, "blip2", require_frozen=False), lavis)


@pytest.mark.parametrize("kind,cross_freq", CASES)
def test_ours_matches_transformers_names_and_shapes(kind: str, cross_freq: int) -> None:
    ours = lavis_to_ours(lavis_state_dict(kind, cross_freq), kind)
    model = hf_model(kind, cross_freq)
    expected = model.state_dict()
    extras = OURS_EXTRAS if kind == "blip2" else set()
    assert set(ours) - set(expected) == extras
    assert set(expected) - set(ours) == set()
    for k, t in expected.items():
        assert ours[k].shape == t.shape, (k, ours[k].shape, t.shape)
    hf_only = {k: v for k, v in ours.items() if k not in extras}
    model.load_state_dict(hf_only, strict=True)
    loaded = model.state_dict()
    tied = {"language_model.lm_head.weight"}  # transformers ties it; a fresh tiny OPT/T5 has it tied too
    for k in hf_only.keys() - tied:
        assert torch.equal(loaded[k], hf_only[k].to(loaded[k].dtype)), k


def test_qkv_bias_and_ties() -> None:
    lavis = lavis_state_dict("blip2", 1)
    ours = lavis_to_ours(lavis, "blip2")
    bias = ours["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    q, k, v = bias.chunk(3)
    assert torch.equal(q, lavis["visual_encoder.blocks.1.attn.q_bias"]) and not k.any()
    assert torch.equal(v, lavis["visual_encoder.blocks.1.attn.v_bias"])
    assert ours["qformer_lm_head.bias"] is lavis["Qformer.cls.predictions.bias"]

    trained = dict(ours)
    trained["vision_model.encoder.layers.1.self_attn.qkv.bias"] = bias + 1
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv\.bias.*k-third"):
        ours_to_lavis(trained, "blip2")

    untied = dict(lavis)
    untied["Qformer.cls.predictions.decoder.weight"] = torch.randn(VOCAB, Q)
    with pytest.raises(ValueError, match=r"decoder\.weight.*untied"):
        lavis_to_ours(untied, "blip2")


def test_unknown_and_missing_keys_are_all_named() -> None:
    lavis = lavis_state_dict("blip2_opt", 2, frozen=False)
    lavis["Qformer.bert.pooler.dense.weight"] = torch.zeros(1)
    lavis["opt_projection.weight"] = torch.zeros(1)
    del lavis["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    del lavis["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    with pytest.raises(KeyMapError) as err:
        lavis_to_ours(lavis, "blip2_opt", require_frozen=False)
    assert err.value.unmatched == ["Qformer.bert.pooler.dense.weight", "opt_projection.weight"]
    assert err.value.missing == [
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        "Qformer.bert.encoder.layer.1.output_query.dense.bias",
    ]
    for key in err.value.unmatched + err.value.missing:
        assert key in str(err.value)


def test_missing_layer_of_text_ffn_and_partial_frozen_group() -> None:
    lavis = lavis_state_dict("blip2", 2)
    for k in [k for k in lavis if k.startswith("Qformer.bert.encoder.layer.1.intermediate.")]:
        del lavis[k]  # a whole module gone: caught because layer 1 exists for the query path
    del lavis["visual_encoder.blocks.1.attn.v_bias"]  # a partial frozen group is an error even if optional
    with pytest.raises(KeyMapError) as err:
        lavis_to_ours(lavis, "blip2", require_frozen=False)
    assert err.value.missing == [
        "Qformer.bert.encoder.layer.1.intermediate.dense.bias",
        "Qformer.bert.encoder.layer.1.intermediate.dense.weight",
        "visual_encoder.blocks.1.attn.v_bias",
    ]


def test_position_ids_buffer_is_dropped_checked_and_recreated() -> None:
    lavis = lavis_state_dict("blip2_t5", 1, frozen=False)
    del lavis["Qformer.bert.embeddings.position_ids"]  # no information in it: its absence is accepted
    ours = lavis_to_ours(lavis, "blip2_t5", require_frozen=False)
    back = ours_to_lavis(ours, "blip2_t5", require_frozen=False)
    assert torch.equal(back.pop("Qformer.bert.embeddings.position_ids"), torch.arange(512)[None])  # BERT's
    assert_identical(back, lavis)
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(1, MAX_POS + 1)[None]
    with pytest.raises(ValueError, match="position_ids.*arange"):
        lavis_to_ours(lavis, "blip2_t5", require_frozen=False)


def test_wrong_kind_fails_loudly() -> None:
    with pytest.raises(KeyMapError, match="opt_proj.weight"):
        lavis_to_ours(lavis_state_dict("blip2_opt", 2), "blip2_t5")
    with pytest.raises(ValueError, match="unknown LAVIS kind"):
        lavis_to_ours({}, "blip2_llama")  # type: ignore[arg-type]


def test_engine_rejects_ambiguous_tables() -> None:
    rules = (rename("a.{}.w", "x.{}.w", "g"), rename("a.{*}", "y.{*}", "g"))
    with pytest.raises(ValueError, match="several rules"):
        convert({"a.0.w": torch.zeros(1)}, rules)
    assert convert(convert({"a.0.w": torch.zeros(1)}, rules[:1]), reverse(rules[:1])).keys() == {"a.0.w"}


@pytest.mark.parametrize("kind", KINDS)
def test_load_lavis_checkpoint(tmp_path, kind: str) -> None:
    sd = lavis_state_dict(kind, 2)
    path = tmp_path / "model.pth"
    torch.save({"model": sd, "epoch": 3}, path)  # LAVIS's layout: {"model": state_dict, ...}
    loaded, detected = load_lavis_checkpoint(path)
    assert detected == kind == detect_kind(sd)
    assert_identical(loaded, sd)
    assert set(lavis_to_ours(loaded, detected)) == set(lavis_to_ours(sd, kind))


def test_load_lavis_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_lavis_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(KeyMapError, match="not a LAVIS BLIP-2"):
        load_lavis_checkpoint(tmp_path / "other.pth")
