"""Frozen LLMs from transformers: decoder-only (causal.py) and encoder-decoder (seq2seq.py)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from blip2.models.config import LanguageConfig
from blip2.models.language.base import LanguageModel
from blip2.models.language.causal import CausalLanguageModel
from blip2.models.language.seq2seq import Seq2SeqLanguageModel


def build_language_model(cfg: LanguageConfig) -> PreTrainedModel:
    """An LLM with random (or empty) weights, to be filled by a checkpoint."""
    config = AutoConfig.for_model(**cfg.hf_config)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config)


def load_pretrained_language_model(cfg: LanguageConfig) -> PreTrainedModel:
    """The LLM's frozen weights from `cfg.pretrained`: a hub name, a folder, or a GGUF file in a folder."""
    if cfg.pretrained is None:
        raise ValueError("this language config names no pretrained weights")
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    if cfg.gguf_file:
        return auto.from_pretrained(str(Path(cfg.pretrained)), gguf_file=cfg.gguf_file)
    return auto.from_pretrained(cfg.pretrained)


def language_view(model: PreTrainedModel) -> LanguageModel:
    if model.config.is_encoder_decoder:
        return Seq2SeqLanguageModel(model)
    return CausalLanguageModel(model)


__all__ = ["LanguageModel", "build_language_model", "language_view", "load_pretrained_language_model"]
