"""LoRA adapters on the frozen LLM, through peft (Hu et al. 2021; QLoRA: Dettmers et al. 2023).

BLIP-2 keeps the LLM frozen and trains only the bridge; LoRA adds a trainable low-rank update
W + (alpha / r) * B @ A to chosen linear layers of the LLM (`targets`: by default peft's per-family choice,
q_proj/v_proj for OPT and Llama, q/v for T5), so the LLM adapts to the soft prompt for a few MB of weights.

The adapters are injected *in place* (`peft.inject_adapter_in_model`): `model.language_model` stays the
transformers model every other part of blip2 calls (generate, caches, embeddings); only the targeted layers
become peft LoRA layers (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`). On disk the
adapters are peft's own format, a folder `adapter/` beside our weights holding adapter_config.json and
adapter_model.safetensors with PeftModel's key names, so `PeftModel.from_pretrained(llm, folder/"adapter")`
reads it as well as we do.

peft is an optional dependency (the `train` extra): this module imports it only when called.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_DIR = "adapter"  # the subfolder beside model.safetensors (exports) or trainable.safetensors (training)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for a model's only adapter
PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's keys: the LLM under PeftModel -> LoraModel


class LoraError(ValueError):
    """LoRA cannot be set up as asked: the message names the setting (or the missing package)."""


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError("LoRA needs the peft package: pip install peft (or pip install 'blip2[train]')") from None
    return peft


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (peft names them lora_A / lora_B / lora_embedding_*)."""
    return ".lora_" in name


def has_adapters(llm: nn.Module) -> bool:
    return any(is_adapter_param(name) for name, _ in llm.named_parameters())


def default_targets(llm: nn.Module) -> list[str]:
    """peft's usual LoRA targets for the LLM's family (query and value projections)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    model_type = getattr(llm.config, "model_type", "")
    if model_type not in TARGETS:
        raise LoraError(f"no default LoRA targets for the {model_type!r} LLM: set lora.targets to the names of "
                        "its attention projections (e.g. [q_proj, v_proj])")
    return list(TARGETS[model_type])


def lora_config(llm: nn.Module, r: int, alpha: float, dropout: float, targets: Sequence[str] = (),
                base_model: str | None = None):
    """peft's LoraConfig for this LLM; `targets` empty = the family's default."""
    peft = _peft()
    if r < 1:
        raise LoraError(f"lora.r must be at least 1 to add adapters, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"lora.dropout must be in [0, 1), got {dropout}")
    names = list(targets) or default_targets(llm)
    found = {name.rsplit(".", 1)[-1] for name, m in llm.named_modules()}
    absent = [t for t in names if t not in found]
    if absent:
        raise LoraError(f"lora.targets {absent} name no module of the {llm.config.model_type} LLM (it has e.g. "
                        f"{sorted(n for n in found if n)[:12]})")
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                           base_model_name_or_path=base_model)


def add_adapters(llm: nn.Module, config) -> nn.Module:
    """Inject fresh LoRA layers into `llm` in place (A: peft's Kaiming init from torch's RNG, B: zeros, so the
    model's output is unchanged until it trains). The adapters are float32 whatever the LLM's dtype: AdamW
    updates on bf16 weights would round most steps away (peft's `autocast_adapter_dtype`)."""
    peft = _peft()
    if has_adapters(llm):
        raise LoraError("the LLM already has LoRA adapters")
    peft.inject_adapter_in_model(config, llm, adapter_name=ADAPTER_NAME)
    for name, p in llm.named_parameters():
        if is_adapter_param(name):
            p.data = p.data.float()
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    set_adapter_dropout(llm, llm.training)  # new modules start in training mode; a frozen LLM is in eval
    return llm


def set_adapter_dropout(llm: nn.Module, training: bool) -> None:
    """Blip2Model keeps the frozen LLM in eval mode (no dropout in it); LoRA's dropout is part of what trains,
    so it follows the training mode on its own."""
    for name, module in llm.named_modules():
        if name.endswith(".lora_dropout"):
            module.train(training)


def adapter_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PeftModel's key names (`base_model.model.<module>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(llm, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapters(llm: nn.Module, folder: str | Path) -> Path:
    """Write `folder` (normally `<checkpoint>/adapter`) in peft's format: adapter_config.json and
    adapter_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llm.peft_config[ADAPTER_NAME]
    config.save_pretrained(str(folder))
    save_file(adapter_state(llm), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def read_adapter_config(folder: str | Path):
    """The LoraConfig stored in an adapter folder (a clear error when it is not one)."""
    peft = _peft()
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise LoraError(f"{folder} is not a LoRA adapter folder (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    data = json.loads((folder / ADAPTER_CONFIG).read_text())
    if data.get("peft_type") != "LORA":
        raise LoraError(f"{folder / ADAPTER_CONFIG} holds a {data.get('peft_type')!r} adapter; we read LoRA only")
    return peft.LoraConfig.from_pretrained(str(folder))


def load_adapters(llm: nn.Module, folder: str | Path, inject: bool = True) -> nn.Module:
    """Read an adapter folder into `llm`: inject its LoRA layers (unless `inject` is False: they are there
    already, as when a training run resumes) and copy every adapter weight, strictly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    if inject:
        add_adapters(llm, config)
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    expected = set(adapter_state(llm))
    got = {PEFT_PREFIX + k for k in state}
    if expected != got:
        raise LoraError(f"the adapters in {folder} do not fit this LLM: missing {sorted(expected - got)[:4]}, "
                        f"unexpected {sorted(got - expected)[:4]}")
    with torch.no_grad():
        set_peft_model_state_dict(llm, state, adapter_name=ADAPTER_NAME)
    return llm


def _tuner_layers(llm: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, LoRA layer) for every outermost peft layer of `llm`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found, names = [], []
    for name, module in llm.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(n + ".") for n in names):
            parent_name, _, attr = name.rpartition(".")
            found.append((llm.get_submodule(parent_name), attr, module))
            names.append(name)
    return found


def merge_adapters(llm: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += alpha/r * B @ A, peft's `merge`) and put the plain layer
    back, as peft's `merge_and_unload`: the LLM is then an ordinary transformers model again."""
    for parent, attr, layer in _tuner_layers(llm):
        layer.merge(safe_merge=True)  # safe: a NaN from a diverged adapter fails here, not in generation
        setattr(parent, attr, layer.get_base_layer())
    if hasattr(llm, "peft_config"):
        del llm.peft_config
    return llm


@contextmanager
def adapters_detached(llm: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the LLM holds its plain (unmerged) base layers, with their original parameter names,
    so its state dict is the frozen LLM's; the LoRA layers come back afterwards. Nothing is copied."""
    layers = _tuner_layers(llm)
    for parent, attr, layer in layers:
        setattr(parent, attr, layer.get_base_layer())
    try:
        yield llm
    finally:
        for parent, attr, layer in layers:
            setattr(parent, attr, layer)


def merge_into_model(model: Any) -> Any:
    """A Blip2Model whose LLM carries adapters -> the same model with them merged, and its config saying the
    LLM is stored inline (a merged LLM is no longer the one `language.pretrained` names), so `save_model`
    writes the merged weights and the folder loads without peft."""
    merge_adapters(model.language_model)
    lang = model.config.language
    if lang.pretrained is not None or lang.gguf_file is not None:  # hf_config still describes the LLM
        model.config = dataclasses.replace(model.config,
                                           language=dataclasses.replace(lang, pretrained=None, gguf_file=None))
    return model


def load_into_model(model: Any, folder: str | Path) -> Any:
    """`blip2.load`'s hook: a checkpoint folder's `adapter/` applied to its LLM and merged in, so inference runs
    a plain transformers LLM (no LoRA cost per token) that gives the adapter model's outputs."""
    load_adapters(model.language_model, folder)
    return merge_into_model(model)
