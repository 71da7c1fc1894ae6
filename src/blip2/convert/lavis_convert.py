"""`blip2 convert`: a LAVIS .pth checkpoint -> a folder in transformers' BLIP-2 layout.

Released LAVIS checkpoints hold only what was trained (Q-Former, queries, ln_vision, projections): the
frozen ViT and LLM weights come from elsewhere. `vision` names a transformers BLIP-2 folder or hub name
(e.g. Salesforce/blip2-opt-2.7b) whose `vision_model.*` weights are the same EVA ViT-g; `llm` names the
LLM (e.g. facebook/opt-2.7b, google/flan-t5-xl). Shapes the state dict cannot tell (attention heads) follow
BLIP-2's published architectures unless given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from blip2.convert.checkpoint import build_model, read_state_dict, resolve, save_model
from blip2.convert.lavis import lavis_to_ours, load_lavis_checkpoint
from blip2.models.config import Blip2Config, ImageConfig, LanguageConfig, QFormerConfig, VisionConfig

EVA_HEADS = {1408: 16}
IMAGE_TOKEN = "<image>"  # REFERENCE §4: ViT-g/14 has 16 heads of 88


def _count_layers(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def qformer_config_from_state(sd: dict[str, torch.Tensor], text: bool, heads: int | None = None) -> QFormerConfig:
    hidden = sd["query_tokens"].shape[-1]
    layers = _count_layers(sd, r"qformer\.encoder\.layer\.(\d+)\.")
    cross = _count_layers(sd, r"qformer\.encoder\.layer\.(\d+)\.crossattention\.")
    frequency = cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1)
    vocab = sd["embeddings.word_embeddings.weight"].shape[0] if text else 30523
    positions = sd["embeddings.position_embeddings.weight"].shape[0] if text else 512
    return QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads or max(hidden // 64, 1),
        intermediate_size=sd["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=frequency,
        encoder_hidden_size=sd[f"qformer.encoder.layer.{cross[0]}.crossattention.attention.key.weight"].shape[1],
        vocab_size=vocab,
        max_position_embeddings=positions,
        use_text_input=text,
    )


def eva_config_from_state(sd: dict[str, torch.Tensor], heads: int | None = None) -> dict:
    width = sd["vision_model.embeddings.class_embedding"].shape[-1]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = sd["vision_model.embeddings.position_embedding"].shape[1]
    side = int(round((positions - 1) ** 0.5))
    return {
        "model_type": "blip_2_vision_model",
        "hidden_size": width,
        "intermediate_size": sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_count_layers(sd, r"vision_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": heads or EVA_HEADS.get(width, max(width // 64, 1)),
        "patch_size": patch,
        "image_size": side * patch,
        "layer_norm_eps": 1e-6,  # REFERENCE §1: HF's post_layernorm eps (LAVIS used 1e-5)
        "qkv_bias": True,
    }


def _vision_from(source: str) -> tuple[dict, dict[str, torch.Tensor], ImageConfig | None]:
    folder = resolve(source)
    cfg = json.loads((folder / "config.json").read_text())
    vision_cfg = cfg.get("vision_config") or cfg.get("blip2", {}).get("vision", {}).get("hf_config")
    if not vision_cfg:
        raise ValueError(f"{source} has no BLIP-2 vision_config to take the ViT from")
    weights = {k: v for k, v in read_state_dict(folder).items() if k.startswith("vision_model.")}
    from blip2.convert.hf import image_config_from_preprocessor

    pre = folder / "preprocessor_config.json"
    image = image_config_from_preprocessor(json.loads(pre.read_text()), int(vision_cfg.get("image_size", 224))) if pre.exists() else None
    return vision_cfg, weights, image


def _llm_config(kind: str, llm: str, tokenizer) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llm).to_dict()
    if kind == "blip2_opt":
        # REFERENCE §3/§8: OPT generation stops at the newline token.
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if newline:
            config["eos_token_id"] = newline[-1]
    if kind == "blip2_t5":
        config["dense_act_fn"] = "gelu"  # LAVIS overrides T5's activation (REFERENCE §3)
    return config


def convert_lavis(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    llm: str | None = None,
    vision: str | None = None,
    qformer_tokenizer: str | None = None,
    qformer_heads: int | None = None,
    vision_heads: int | None = None,
) -> Path:
    """Convert `src` (.pth) into `dst`; returns the folder, loadable with `blip2.load` (and by transformers
    when the result is a full BLIP-2 with an EVA ViT)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    lavis, kind = load_lavis_checkpoint(src)
    sd = lavis_to_ours(lavis, kind, require_frozen=False)
    stage1 = kind == "blip2"
    image = None
    if "vision_model.embeddings.class_embedding" in sd:
        vision_cfg = eva_config_from_state(sd, vision_heads)
    elif vision is not None:
        vision_cfg, vision_weights, image = _vision_from(vision)
        sd = {**{k: v for k, v in vision_weights.items() if not k.startswith("vision_model.post_layernorm")}, **sd}
    else:
        raise ValueError(
            f"{src} holds no ViT weights (LAVIS does not save frozen parts): pass vision=<a BLIP-2 folder or hub "
            "name with the same EVA ViT, e.g. Salesforce/blip2-opt-2.7b>"
        )
    image = image or ImageConfig(size=int(vision_cfg.get("image_size", 224)))

    language = None
    tokenizer = None
    if not stage1:
        if llm is None:
            raise ValueError(f"{src} is a {kind} checkpoint: pass llm=<the LLM's folder or hub name>")
        tokenizer = AutoTokenizer.from_pretrained(llm)
        language = LanguageConfig(hf_config=_llm_config(kind, llm, tokenizer))
        if not any(k.startswith("language_model.") for k in sd):
            auto = AutoModelForSeq2SeqLM if kind == "blip2_t5" else AutoModelForCausalLM
            lm_state = auto.from_pretrained(llm).state_dict()
            sd.update({f"language_model.{k}": v for k, v in lm_state.items()})

    image_token_index = None
    if tokenizer is not None:
        # transformers' BLIP-2 places the queries on `num_query_tokens` placeholder tokens (REFERENCE §9).
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        vocab = int(language.hf_config["vocab_size"])
        if image_token_index >= vocab:
            raise ValueError(f"the LLM's embedding table ({vocab} rows) has no free row for {IMAGE_TOKEN}")

    cfg = Blip2Config(
        vision=VisionConfig(kind="blip2", hf_config=vision_cfg, image=image),
        qformer=qformer_config_from_state(sd, text=stage1, heads=qformer_heads),
        language=language,
        num_query_tokens=sd["query_tokens"].shape[1],
        image_text_hidden_size=sd["vision_projection.weight"].shape[0] if stage1 else 256,
        stage1_heads=stage1,
        itg_head=stage1 and "qformer_lm_head.bias" in sd,
        image_token_index=image_token_index,
    )
    model = build_model(cfg, sd)
    qtok = AutoTokenizer.from_pretrained(qformer_tokenizer) if qformer_tokenizer else None
    if stage1 and qtok is not None and "[DEC]" not in qtok.get_vocab():
        qtok.add_special_tokens({"bos_token": "[DEC]"})  # REFERENCE §1
    if stage1:
        return save_model(model, dst, tokenizer=qtok)
    return save_model(model, dst, tokenizer=tokenizer, qformer_tokenizer=qtok)
