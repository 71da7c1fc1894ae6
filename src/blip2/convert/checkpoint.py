"""Load and save BLIP-2 checkpoints in transformers' folder layout (REFERENCE §8).

A folder holds config.json (+ our "blip2" block), model.safetensors (or shards with an index), the LLM
tokenizer (or, for retrieval models, the Q-Former's BERT tokenizer), `qformer_tokenizer/` when a model
needs both, and preprocessor_config.json. Frozen parts that come from a package or the hub
(`pretrained` in their config) are not stored: only the trainable weights and a reference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from blip2.convert import instructblip
from blip2.convert.hf import config_from_hf, config_to_hf, image_config_to_preprocessor
from blip2.convert.loading import LOW_PRECISION_PARTS, WEIGHTS, WEIGHTS_INDEX, DtypeRule, cast_rule, read_state
from blip2.models.blip2 import Blip2Model
from blip2.models.language import lora
from blip2.models.config import Blip2Config, VisionConfig

# Buffers some writers store; ours are recomputed (REFERENCE §8: the expected unexpected keys).
IGNORED_KEYS = ("qformer.embeddings.position_ids", "embeddings.position_ids")
# Present in our stage-1 checkpoints, absent from transformers' retrieval ones: defaults are fine.
OPTIONAL_KEYS = {"temp": 0.07}


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: the message names the missing or unexpected keys."""


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a hub name fetched (or found in the cache) with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: it is not a BLIP-2 checkpoint folder")
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; give a checkpoint folder (use `blip2 convert` for LAVIS .pth files)")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {name!r} and it is not a hub name like 'Salesforce/blip2-opt-2.7b'")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "qformer_tokenizer/*"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not (completely) in the cache yet: fetch it below
        pass
    # The CLI silences the hub's own progress bars; a multi-GB download must still say what it is doing.
    logging.getLogger("blip2.convert").info(
        "downloading %s from the Hugging Face hub into its cache (large checkpoints take minutes; -v shows progress)",
        name,
    )
    try:
        folder = snapshot_download(name, allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, no permission: one clear sentence for the user
        raise FileNotFoundError(
            f"could not get {name!r} from the Hugging Face hub or its local cache ({type(err).__name__}); "
            "check the name, your network, or pass a local folder"
        ) from None
    return Path(folder)


def _check_weights(folder: Path) -> None:
    if not (folder / WEIGHTS_INDEX).exists() and not (folder / WEIGHTS).exists():
        found = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "none"
        raise CheckpointError(f"{folder} has no {WEIGHTS} (pytorch .bin files found: {found}; we only read safetensors)")


def read_state_dict(
    folder: Path,
    prefix: str = "",
    rule: DtypeRule | None = None,
    device: str | torch.device | None = None,
    keep: Callable[[str], bool] = lambda key: True,
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors file(s), or only those whose key starts with `prefix`
    (only the shards holding them are opened), read one at a time (convert/loading.py): as stored, or each
    cast by `rule` and put on `device` as it is read."""
    _check_weights(folder)
    return read_state(folder, rule, device, keep, prefix)


def pretrained_vision(
    cfg: VisionConfig, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> torch.nn.Module:
    """The frozen image tower with its weights. Packaged and transformers towers load themselves; BLIP-2's EVA
    ViT (kind "blip2") takes the `vision_model.*` tensors of a BLIP-2 checkpoint named by `pretrained` (a
    folder or hub name such as Salesforce/blip2-opt-2.7b: only its vision shard is read), which is how a
    stage 1 starts from the published ViT-g."""
    from accelerate import init_empty_weights

    from blip2.models.vision import build_vision_encoder

    if not (cfg.kind == "blip2" and cfg.pretrained is not None):
        return build_vision_encoder(cfg, load_pretrained=True)
    prefix = "vision_model."
    stored = read_state_dict(resolve(cfg.pretrained), prefix, cast_rule(dtype) if dtype else None, device)
    state = {k.removeprefix(prefix): v for k, v in stored.items()}
    if not state:
        raise CheckpointError(f"{cfg.pretrained} holds no {prefix}* tensors: name a BLIP-2 checkpoint for the ViT")
    with init_empty_weights(include_buffers=False):  # a ViT-g is 1B parameters: never allocate them twice
        tower = build_vision_encoder(cfg)
    missing, unexpected = tower.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{cfg.pretrained}'s vision model does not fit vision.hf_config: missing "
                              f"{_short(missing)}; unexpected {_short(unexpected)}")
    return tower


def stored_keys(model: Blip2Model) -> list[str]:
    """The state-dict keys a checkpoint of this model holds: frozen parts with an external source are left
    out, but their trainable pieces (the vision post-LN) stay."""
    cfg = model.config
    skip: list[str] = []
    if cfg.vision.pretrained is not None or cfg.vision.kind == "efficientnet_lite0":
        skip.append("vision_model.")
    if cfg.language is not None and cfg.language.pretrained is not None:
        skip.append("language_model.")
    keep = model.trainable_prefixes()
    keys = []
    for key in model.state_dict():
        if key.startswith(tuple(skip)) and not key.startswith(keep):
            continue
        keys.append(key)
    return keys


def build_model(
    cfg: Blip2Config,
    state: dict[str, torch.Tensor],
    language_model: torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Blip2Model:
    """Build the model without allocating its weights, fetch the frozen parts that live elsewhere (a BLIP-2
    ViT and a `pretrained` LLM read in `dtype`, the ViT onto `device`), then take every other tensor from
    `state`, strictly. `language_model`: an LLM already loaded and placed (a device map, 8/4-bit), used as is."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = Blip2Model(cfg)
    if cfg.vision.pretrained is not None or cfg.vision.kind == "efficientnet_lite0":
        model.vision_model = pretrained_vision(cfg.vision, dtype, device)
    if language_model is not None:
        model.language_model = language_model
    elif cfg.language is not None and cfg.language.pretrained is not None:
        from blip2.models.language import load_pretrained_language_model

        model.language_model = load_pretrained_language_model(cfg.language, dtype)

    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    expected = set(stored_keys(model))
    unexpected = set(state) - set(model.state_dict())
    if unexpected:
        raise CheckpointError(f"checkpoint has keys this model does not: {_short(unexpected)}")
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "language_model") and language_model is None:
        model.language_model.tie_weights()
    for key, value in OPTIONAL_KEYS.items():
        if key in expected and key not in state:
            setattr(model, key, torch.nn.Parameter(torch.tensor(value)))
    # A placed LLM's disk-offloaded weights stay on "meta" by design (accelerate loads them per forward).
    placed = ("language_model.",) if language_model is not None else ()
    missing = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and not name.startswith(placed)]
    if missing:
        raise CheckpointError(f"checkpoint lacks keys this model needs: {_short(missing)}")
    model.freeze_frozen_parts()
    return model.eval()


def cast(model: Blip2Model, dtype: torch.dtype | None) -> Blip2Model:
    """Frozen towers and the projection in `dtype`; the Q-Former and its queries stay in float32, as in
    transformers (`_keep_in_fp32_modules`) and LAVIS (half-precision frozen parts, REFERENCE §3).
    `loading.target_dtype` is this rule per tensor."""
    if dtype is None or dtype == torch.float32:
        return model.float()
    for name in LOW_PRECISION_PARTS:
        if hasattr(model, name):
            getattr(model, name).to(dtype)
    return model


@contextmanager
def _without_language_model(model: Blip2Model, leave_out: bool) -> Iterator[None]:
    """Hide a placed LLM (device map, 8/4-bit) from whole-model `.to()`/`.float()`: accelerate and
    bitsandbytes own where and in what its weights live."""
    lm = model._modules.pop("language_model") if leave_out else None
    try:
        yield
    finally:
        if lm is not None:
            model._modules["language_model"] = lm


def _main_device(lm: torch.nn.Module) -> str:
    """The first accelerator in a placed LLM's device map (where the ViT and Q-Former then go), else cpu."""
    for where in getattr(lm, "hf_device_map", {}).values():
        if where not in ("cpu", "disk", "meta"):
            return f"cuda:{where}" if isinstance(where, int) else str(where)
    return str(next(lm.parameters()).device).replace("meta", "cpu")


def _float32_llm(rule: DtypeRule) -> DtypeRule:
    return lambda key, stored: (torch.float32 if key.startswith("language_model.") and stored.is_floating_point
                                else rule(key, stored))


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    quantize: str | None = None,
) -> tuple[Blip2Model, Path]:
    """Load a checkpoint folder or hub name. Every stored tensor is read alone, cast to `dtype` by `cast`'s
    rule and put on `device` as it is read (convert/loading.py), so loading never holds a second copy.

    `device_map` ("auto", "balanced", "sequential", or {LLM module name: device}; `max_memory` and
    `offload_folder` as in accelerate) spreads the frozen LLM over GPUs, CPU memory and disk; the ViT and
    Q-Former go to `device` (default: the map's first GPU). `quantize` "8bit"/"4bit" loads the LLM with
    bitsandbytes (CUDA only), the rest in `dtype` (default float16)."""
    from blip2.models.language import check_quantize, load_pretrained_language_model

    check_quantize(quantize, device)
    if quantize is not None and dtype is None:
        dtype = torch.float16
    folder = resolve(name_or_path)
    hf_config = json.loads((folder / "config.json").read_text())
    pre_file = folder / "preprocessor_config.json"
    preprocessor = json.loads(pre_file.read_text()) if pre_file.exists() else None
    try:
        cfg = config_from_hf(hf_config, preprocessor)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json is not a BLIP-2 config we can read: {err}") from None
    language_model = None
    if device_map is not None or quantize is not None:
        if cfg.language is None:
            raise ValueError(f"device_map and quantize place the language model, and {folder} has none")
        inline = cfg.language.pretrained is None  # stored in this folder as language_model.*
        where = device_map or ({"": device} if device is not None else None)
        language_model = load_pretrained_language_model(  # float32 for None: `cast` will not touch it
            cfg.language, dtype or torch.float32, where, max_memory, offload_folder, quantize,
            source=folder if inline else None,
        )
        device = device if device is not None else _main_device(language_model)
    placed = language_model is not None
    rule = cast_rule(dtype)
    adapters = (folder / lora.ADAPTER_DIR).is_dir()
    if adapters and not placed:  # LoRA merges into float32 weights, cast after: the same bits as before
        rule = _float32_llm(rule)
    state = read_state_dict(folder, rule=rule, device=device,
                            keep=lambda key: not (placed and key.startswith("language_model.")))
    # With adapters a referenced LLM also comes in as stored (merged, then cast below).
    model = build_model(cfg, instructblip.state_from_folder(hf_config, state), language_model,
                        None if adapters else dtype, device)
    if adapters:  # LoRA adapters trained on the LLM: merged in (models/language/lora.py)
        lora.load_into_model(model, folder / lora.ADAPTER_DIR)
    with _without_language_model(model, placed):
        cast(model, dtype)  # only what was not read from the folder: buffers, a packaged tower
        if device is not None:
            model.to(device)
    return model, folder


def save_model(model: Blip2Model, folder: str | os.PathLike, tokenizer=None, qformer_tokenizer=None) -> Path:
    """Write `folder` in transformers' layout. With a BLIP-2 EVA tower and an inline LLM the result loads in
    `transformers` (Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval) as well as in ours."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2, sort_keys=True))
    (folder / "preprocessor_config.json").write_text(json.dumps(image_config_to_preprocessor(cfg.vision.image), indent=2))
    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().cpu() for k in stored_keys(model)}
    if hasattr(model, "language_model") and getattr(model.language_model.config, "tie_word_embeddings", False):
        # Tied weights are stored once, as transformers does.
        out = model.language_model.get_output_embeddings()
        if out is not None and out.weight is model.language_model.get_input_embeddings().weight:
            for key in [k for k in tensors if k.startswith("language_model.") and k.endswith("lm_head.weight")]:
                del tensors[key]
    _dedupe_shared(tensors)
    tensors = instructblip.state_for_folder(cfg, tensors)  # InstructBLIP names for question_to_qformer models
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS)
    if cfg.language is not None:
        processor = {"processor_class": instructblip.processor_class(cfg), "num_query_tokens": cfg.num_query_tokens}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if qformer_tokenizer is not None:
        target = folder if tokenizer is None else folder / "qformer_tokenizer"
        qformer_tokenizer.save_pretrained(str(target))
    return folder


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing memory: copy any that still do."""
    seen: dict[int, str] = {}
    for key, t in list(tensors.items()):
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            tensors[key] = t.clone()
        seen[ptr] = key


def init_model(cfg: Blip2Config, bert: str | os.PathLike | None = None) -> Blip2Model:
    """A model to train from scratch: frozen parts from their `pretrained` sources (packages, hub, folders),
    the Q-Former from a BERT checkpoint folder when `bert` is given (REFERENCE §1), the rest BERT-initialised."""
    from accelerate import init_empty_weights

    external = {
        "vision_model": cfg.vision.pretrained is not None or cfg.vision.kind == "efficientnet_lite0",
        "language_model": cfg.language is not None and cfg.language.pretrained is not None,
    }
    with init_empty_weights(include_buffers=False):  # parts loaded below are never allocated twice
        model = Blip2Model(cfg)
    from blip2.models.language import build_language_model, load_pretrained_language_model
    from blip2.models.vision import build_vision_encoder

    model.vision_model = pretrained_vision(cfg.vision) if external["vision_model"] else build_vision_encoder(cfg.vision)
    if cfg.language is not None:
        model.language_model = (
            load_pretrained_language_model(cfg.language) if external["language_model"] else build_language_model(cfg.language)
        )
    for name, child in model.named_children():
        if name not in ("vision_model", "language_model"):
            child.to_empty(device="cpu")
    model.query_tokens = torch.nn.Parameter(torch.empty_like(model.query_tokens, device="cpu"))
    if hasattr(model, "temp"):
        model.temp = torch.nn.Parameter(torch.tensor(0.07))
    if hasattr(model, "qformer_lm_head"):
        torch.nn.init.zeros_(model.qformer_lm_head.bias)
    model.init_trainable_weights()
    if bert is not None:
        from transformers import AutoModel

        from blip2.models.init import init_qformer_from_bert

        init_qformer_from_bert(model, AutoModel.from_pretrained(str(bert)).state_dict())
    model.freeze_frozen_parts()
    return model
