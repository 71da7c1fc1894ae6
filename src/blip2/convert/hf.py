"""transformers' BLIP-2 config format <-> our typed config (REFERENCE §8, §9).

Our parameter names *are* transformers' names, so weights need no key map; only the configs translate.
Our own checkpoints store our full config under the extra key "blip2" of config.json, next to the
transformers fields, so `transformers` still loads what we save when the frozen parts are transformers'.

InstructBLIP (`model_type` "instructblip") is a BLIP-2 whose Q-Former reads the instruction: our
`question_to_qformer` with the question as the LLM's whole prompt (`question_template` "{}"). Its weights use
other names for the Q-Former's text side (convert/instructblip.py); its config differs from BLIP-2's only in
the model types and in having no `use_qformer_text_input` switch (the text side is always there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from blip2.models.config import CLIP_MEAN, CLIP_STD, Blip2Config, ImageConfig, LanguageConfig, QFormerConfig, VisionConfig

RETRIEVAL_ARCH = "Blip2ForImageTextRetrieval"
GENERATION_ARCH = "Blip2ForConditionalGeneration"
INSTRUCTBLIP_ARCH = "InstructBlipForConditionalGeneration"
INSTRUCTBLIP_TYPE = "instructblip"
# The instruction is the LLM's prompt as it is: transformers' InstructBlipProcessor tokenizes the same text for
# the LLM and for the Q-Former, and "<Image>{Question}" is one of the paper's instruction templates (Appendix E).
INSTRUCTBLIP_QUESTION_TEMPLATE = "{}"

_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def image_config_from_preprocessor(pre: dict[str, Any] | None, default_size: int) -> ImageConfig:
    """transformers' BlipImageProcessor settings (preprocessor_config.json) -> ImageConfig (squash resize)."""
    if not pre:
        return ImageConfig(size=default_size)
    size = pre.get("size", default_size)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_size
    resample = _PIL_RESAMPLE.get(int(pre.get("resample", 3)), "bicubic")
    return ImageConfig(
        size=int(size),
        mean=tuple(pre.get("image_mean", CLIP_MEAN)),
        std=tuple(pre.get("image_std", CLIP_STD)),
        resize="squash",
        resample=resample,  # type: ignore[arg-type]
    )


def image_config_to_preprocessor(image: ImageConfig) -> dict[str, Any]:
    return {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2Processor",
        "do_resize": True,
        "size": {"height": image.size, "width": image.size},
        "resample": 3 if image.resample == "bicubic" else 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image.mean),
        "image_std": list(image.std),
        "do_convert_rgb": True,
    }


def uses_instructblip_layout(cfg: Blip2Config) -> bool:
    """Whether we save `cfg` as transformers' InstructBLIP: a Q-Former that reads the instruction, BLIP-2's EVA
    tower and an LLM. (transformers' BLIP-2 class would drop the Q-Former's text side and ignore the question.)"""
    return cfg.question_to_qformer and cfg.vision.kind == "blip2" and cfg.language is not None


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> Blip2Config:
    """A transformers `Blip2Config` or `InstructBlipConfig` dict (config.json) -> our config. Our own
    checkpoints carry "blip2"."""
    if "blip2" in hf:
        return Blip2Config.from_dict(hf["blip2"])
    if hf.get("model_type") == INSTRUCTBLIP_TYPE:
        return _instructblip_config(hf, preprocessor)
    if hf.get("model_type") not in ("blip-2", "blip_2"):
        raise ValueError(f"config.json describes a {hf.get('model_type')!r} model, not BLIP-2 or InstructBLIP")
    retrieval = RETRIEVAL_ARCH in (hf.get("architectures") or [])
    vision_hf = dict(hf.get("vision_config") or {})
    qf = dict(hf.get("qformer_config") or {})
    known = {f.name for f in dataclasses.fields(QFormerConfig)}
    qformer = QFormerConfig(
        **{k: v for k, v in qf.items() if k in known},
        use_text_input=bool(qf.get("use_qformer_text_input", retrieval)),
    )
    image_size = int(vision_hf.get("image_size", 224))
    vision = VisionConfig(kind="blip2", hf_config=vision_hf, image=image_config_from_preprocessor(preprocessor, image_size))
    language = None if retrieval else LanguageConfig(hf_config=dict(hf.get("text_config") or {}))
    return Blip2Config(
        vision=vision,
        qformer=qformer,
        language=language,
        num_query_tokens=int(hf.get("num_query_tokens", 32)),
        image_text_hidden_size=int(hf.get("image_text_hidden_size", 256)),
        stage1_heads=retrieval,
        itg_head=False,
        image_token_index=hf.get("image_token_index"),
    )


def _instructblip_config(hf: dict[str, Any], preprocessor: dict[str, Any] | None) -> Blip2Config:
    text = hf.get("text_config")
    if not text:
        raise ValueError("an InstructBLIP config.json needs a text_config (the LLM)")
    # Our tower is transformers' Blip2VisionModel: InstructBlipVisionModel has the same layers and names.
    vision_hf = {**(hf.get("vision_config") or {}), "model_type": "blip_2_vision_model"}
    qf = dict(hf.get("qformer_config") or {})
    known = {f.name for f in dataclasses.fields(QFormerConfig)} - {"use_text_input"}
    image_size = int(vision_hf.get("image_size", 224))
    return Blip2Config(
        vision=VisionConfig(kind="blip2", hf_config=vision_hf, image=image_config_from_preprocessor(preprocessor, image_size)),
        qformer=QFormerConfig(**{k: v for k, v in qf.items() if k in known}, use_text_input=True),
        language=LanguageConfig(hf_config=dict(text)),
        num_query_tokens=int(hf.get("num_query_tokens", 32)),
        image_token_index=hf.get("image_token_index"),
        question_to_qformer=True,
        question_template=INSTRUCTBLIP_QUESTION_TEMPLATE,
    )


def _instructblip_fields(cfg: Blip2Config) -> dict[str, Any]:
    q = cfg.qformer
    qformer_config = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name != "use_text_input"}
    assert cfg.language is not None  # uses_instructblip_layout
    return dict(
        model_type=INSTRUCTBLIP_TYPE,
        architectures=[INSTRUCTBLIP_ARCH],
        vision_config={**(cfg.vision.hf_config or {}), "model_type": "instructblip_vision_model"},
        qformer_config={**qformer_config, "model_type": "instructblip_qformer"},
        text_config=dict(cfg.language.hf_config),
        num_query_tokens=cfg.num_query_tokens,
        image_token_index=cfg.image_token_index,
        use_decoder_only_language_model=not cfg.language.is_encoder_decoder,
    )


def config_to_hf(cfg: Blip2Config) -> dict[str, Any]:
    """Our config -> config.json: transformers' fields where it can represent the model, plus "blip2"."""
    out: dict[str, Any] = {"blip2": cfg.to_dict()}
    if cfg.vision.kind != "blip2":
        return out  # transformers has no BLIP-2 class for other towers; our loader reads "blip2"
    if uses_instructblip_layout(cfg):
        return {**out, **_instructblip_fields(cfg)}
    q = cfg.qformer
    qformer_config = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name != "use_text_input"}
    qformer_config.update(model_type="blip_2_qformer", use_qformer_text_input=q.use_text_input)
    out.update(
        model_type="blip-2",
        architectures=[RETRIEVAL_ARCH if cfg.language is None else GENERATION_ARCH],
        vision_config={**(cfg.vision.hf_config or {}), "model_type": "blip_2_vision_model"},
        qformer_config=qformer_config,
        num_query_tokens=cfg.num_query_tokens,
        image_text_hidden_size=cfg.image_text_hidden_size,
        image_token_index=cfg.image_token_index,
    )
    if cfg.language is not None:
        out["text_config"] = dict(cfg.language.hf_config)
        out["use_decoder_only_language_model"] = not cfg.language.is_encoder_decoder
    return out
