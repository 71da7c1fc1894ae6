"""Stage 2: the Q-Former's queries become a soft prompt for a frozen LLM, trained with its LM loss
(REFERENCE §3).

    blip2 train stage2 --config configs/stage2.yaml [key=value ...] [--resume]
    torchrun --nproc-per-node 8 -m blip2.recipes.stage2 --config configs/stage2.yaml

The image encoder and the LLM are frozen; the queries, the Q-Former, ln_vision and the projection train.
Decoder-only LLMs (OPT, Llama) read [soft prompt; BOS prompt target EOS] and learn the target; encoder-decoder
LLMs (T5) read [soft prompt; prompt] and decode the target (data/collate.py has the details). Caption data
trains with `prompt` ("" for pretraining, "a photo of" for caption fine-tuning; T5 without a prompt splits
each caption into prefix and suffix); VQA data trains on `prompt.format(question)` -> the most frequent
answer, with the paper's template by default; a VQA record with an empty question is a caption (no template).

Instruction tuning (`instructions: true`, configs/instruct_stage2.yaml): each record is phrased by a template
drawn per sample (data/instructions.py) for its task, caption, VQA or chat turn, instead of `prompt`. `mix`
adds more annotation files of any format to `data` (captions become VQA-format records with an empty question).

LoRA (`lora.r` > 0, models/language/lora.py): peft adapters on the frozen LLM's attention projections train
with the bridge; checkpoints keep them in peft's format under `adapter/`, and `final/` either keeps them beside
the bridge (`blip2.load` merges them into the LLM) or, with `lora.merge`, holds the LLM with them merged.
`lora.quantize: 4bit` is QLoRA: the frozen LLM re-read in NF4 through bitsandbytes, on CUDA only (untested on GPU).

The model comes from (a) `init_from` a stage-1 checkpoint plus `language` (an LLM config: its Q-Former,
queries and ln_vision are taken, the LLM and a fresh projection added), (b) `init_from` a stage-2
checkpoint (continue training), or (c) `model`, a whole Blip2Config (from scratch). One script, top to
bottom: setup -> loop -> save; output_dir/final loads with `blip2.load` (caption, ask, chat).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from blip2.convert.checkpoint import CheckpointError, init_model, load_model, save_model
from blip2.data.collate import LMBatch, decoder_only_batch, encoder_decoder_batch, split_caption
from blip2.data.feature_cache import FeatureCache
from blip2.data.datasets import DatasetError, build_dataset, check_images, collate, read_records
from blip2.data.instructions import as_vqa_records, instruction_batch
from blip2.data.text import chat_prompt, vqa_template
from blip2.data.webdataset import check_shards, webdataset_loader
from blip2.models.blip2 import Blip2Model
from blip2.models.config import Blip2Config, ConfigError as ModelConfigError, LanguageConfig
from blip2.models.language import lora
from blip2.training import checkpoint as ckpt
from blip2.training.config import ConfigError, parse_args, read_yaml, resolve_path, to_dict
from blip2.training.distributed import (
    DistEnv,
    barrier,
    run_distributed,
    mean_over_ranks,
    sum_over_ranks,
)
from blip2.training.loop import (
    PRECISIONS,
    Throughput,
    TrainResult,
    autocast,
    clip_and_step,
    grad_scaler,
    no_sync,
    restore_training_state,
    seed_everything,
    training_state,
    wrap_ddp,
)
from blip2.training.metrics import MetricsLogger, plot_losses, read_metrics
from blip2.training.optim import build_optimizer, build_scheduler
from blip2.training.options import LoraOptions, TrainConfig
from blip2.eval.validation import build_validator
from blip2.training.sampler import make_loader, micro_batches

log = logging.getLogger("blip2.train.stage2")
BRIDGE = ("language_model.", "language_projection.")  # what a stage-1 checkpoint cannot provide


@dataclass
class MixSource:
    """One more annotation file trained together with `data` (Stage2Config.mix)."""

    format: Literal["pairs", "coco", "vqa", "vqav2"] = "pairs"
    path: str = ""
    annotations: str | None = None  # VQAv2 only
    image_root: str = ""  # "" = the file's folder


@dataclass
class Stage2Config(TrainConfig):
    model: dict[str, Any] | str | None = None  # a whole Blip2Config with `language` (mapping or file): from scratch
    init_from: str | None = None  # a stage-1 checkpoint (with `language`) or a stage-2 one (continue)
    language: dict[str, Any] | None = None  # LanguageConfig mapping, added to a stage-1 checkpoint
    tokenizer: str | None = None  # the LLM's tokenizer folder; default: init_from's, or language.pretrained
    prompt: str | None = None  # captions: "" (default) or e.g. "a photo of"; VQA: a template with {}
    append_eos: bool = True  # decoder-only targets end with the tokenizer's EOS, so generation learns to stop
    # Train only the language projection: the stage-1 Q-Former, queries, ln_vision and ITC/ITM/ITG heads stay
    # as they are (and are kept), so one model both talks through the LLM and matches/retrieves.
    freeze_qformer: bool = False
    # Feed each question (or "" for a caption) to the Q-Former as well, so the queries read it with the image
    # (REFERENCE §5, BLIP-2's VQA fine-tune). Needs a stage-1 checkpoint (its text side and tokenizer).
    question_to_qformer: bool = False
    # The frozen LLM's weights during training: "auto" = the autocast dtype on GPU when the LLM is reloaded from
    # `language.pretrained` (REFERENCE §5: LAVIS keeps it in half precision), else its own (an LLM stored in our
    # checkpoints is never rounded unasked); fp32 / bf16 / fp16 = that, and an export that stores the LLM
    # stores it so.
    llm_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    lr: float = 1e-4
    min_lr: float = 5e-5  # paper: stage-2 minimum lr 5e-5 (REFERENCE §5)
    lora: LoraOptions = dataclasses.field(default_factory=LoraOptions)  # off unless lora.r > 0
    # Instruction tuning: phrase every record with a template of its task (caption / VQA / chat turn) drawn per
    # sample from data/instructions.py, instead of `prompt` (which must then be unset).
    instructions: bool = False
    # More annotation files trained with `data` (e.g. COCO captions + VQAv2 + chat turns for instruction tuning):
    # all become one VQA-format dataset, caption records with an empty question (data/instructions.py).
    mix: list[MixSource] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------ setup


def model_config(spec: dict[str, Any] | str) -> Blip2Config:
    data = read_yaml(spec) if isinstance(spec, str) else spec
    return Blip2Config.from_dict(data)


def stage2_from_stage1(stage1: Blip2Model, cfg: Stage2Config) -> Blip2Model:
    """A stage-2 model holding the stage-1 model's image encoder, ln_vision, queries and Q-Former (query path);
    the LLM comes from its config, the language projection starts fresh (REFERENCE §3)."""
    if cfg.model is not None:
        mcfg = model_config(cfg.model)
    elif cfg.language is not None:
        base = stage1.config
        if cfg.freeze_qformer or cfg.question_to_qformer:  # keep the stage-1 text side (and heads)
            mcfg = dataclasses.replace(base, language=LanguageConfig.from_dict(cfg.language),
                                       question_to_qformer=cfg.question_to_qformer)
        else:
            mcfg = dataclasses.replace(
                base, language=LanguageConfig.from_dict(cfg.language), stage1_heads=False, itg_head=False,
                qformer=dataclasses.replace(base.qformer, use_text_input=False),
            )
    else:
        raise ConfigError("init_from is a stage-1 checkpoint: also give `language` (the LLM's config) or `model`")
    if mcfg.language is None:
        raise ConfigError("the stage-2 model config has no `language` block")
    model = init_model(mcfg)  # the LLM from its source; the image encoder is replaced just below
    source, target = stage1.state_dict(), model.state_dict()
    needed = [k for k in target if not k.startswith(BRIDGE)]
    missing = [k for k in needed if k not in source]
    wrong = [f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in needed
             if k in source and source[k].shape != target[k].shape]
    if missing or wrong:
        raise ConfigError(f"the stage-1 checkpoint {cfg.init_from} does not fit the stage-2 model: "
                          f"missing {missing[:6]}, different shapes {wrong[:6]}")
    model.load_state_dict({k: source[k] for k in needed}, strict=False)
    model.freeze_frozen_parts()
    log.info("stage 2 from stage 1: took %d tensors (image encoder, queries, Q-Former), new: language projection",
             len(needed))
    return model


def _check_model_source(cfg: Stage2Config) -> None:
    if cfg.init_from is None and cfg.model is None:
        raise ConfigError("give `init_from` (a stage-1 or stage-2 checkpoint folder) or `model` (a model config)")
    if cfg.init_from is None and cfg.language is not None:
        raise ConfigError("`language` goes with init_from a stage-1 checkpoint; put it inside `model` instead")


def check_config(cfg: Stage2Config) -> None:
    """Mistakes a config can show before anything is loaded."""
    _check_model_source(cfg)
    if not cfg.data.path:
        raise ConfigError("set data.path: the annotation file to train on")
    if cfg.grad_accum < 1 or cfg.steps < 1:
        raise ConfigError("steps and grad_accum must be at least 1")
    check_lora(cfg)
    if cfg.mix and cfg.data.format == "webdataset":
        raise ConfigError("mix adds annotation files to an annotation-file dataset, not to webdataset shards")
    if cfg.instructions and cfg.prompt is not None:
        raise ConfigError("instructions: true phrases every record with its own templates: unset `prompt` "
                          "(prompt=null)")


def build_model(cfg: Stage2Config) -> tuple[Blip2Model, Path | None]:
    """The model to train and the stage-2 checkpoint folder it continues (None otherwise)."""
    _check_model_source(cfg)
    if cfg.init_from is None:
        model = init_model(model_config(cfg.model))
        folder = None
    else:
        base, folder = load_model(cfg.init_from)
        if base.config.language is None:
            model = stage2_from_stage1(base, cfg)
            folder = None  # its tokenizer is the Q-Former's BERT one, not the LLM's
        elif cfg.model is not None or cfg.language is not None:
            raise ConfigError(f"{cfg.init_from} is already a stage-2 checkpoint: drop `model` and `language`")
        elif cfg.question_to_qformer and not base.config.question_to_qformer:
            raise ConfigError(f"{cfg.init_from} was not trained with question_to_qformer: start from its stage-1 "
                              "checkpoint (init_from + language) to turn it on")
        else:
            model = base
    if model.config.language is None:
        raise ConfigError("stage 2 needs a model with a language model")
    if cfg.freeze_qformer:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("language_projection."))
    return model, folder


def load_tokenizer(cfg: Stage2Config, folder: Path | None, model: Blip2Model):
    from transformers import AutoTokenizer

    lang = model.config.language
    source = str(resolve_path(cfg.tokenizer)) if cfg.tokenizer else None
    kwargs: dict[str, Any] = {}
    if source is None and folder is not None and (folder / "tokenizer_config.json").exists():
        source = str(folder)
    if source is None and lang.pretrained is not None:  # the LLM's own folder (or GGUF file)
        source = str(resolve_path(lang.pretrained)) if lang.pretrained.startswith("package:") else lang.pretrained
        kwargs = {"gguf_file": lang.gguf_file} if lang.gguf_file else {}
    if source is None:
        raise ConfigError("set `tokenizer`: the folder of the LLM's tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = model.language_model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer at {source} has {len(tokenizer)} tokens, more than the LLM's {vocab}")
    return tokenizer


def stop_token(model: Blip2Model) -> int | None:
    """The token the LLM's generation stops at (its generation config's first EOS), so training targets end
    with what generation waits for."""
    eos = model.language_model.generation_config.eos_token_id
    if eos is None:
        eos = model.language_model.config.eos_token_id
    return eos[0] if isinstance(eos, list) and eos else eos


def qformer_tokenizer(cfg: Stage2Config, model: Blip2Model):
    """The Q-Former's BERT tokenizer, saved beside the LLM's when the model keeps its stage-1 heads."""
    if not (model.config.stage1_heads or model.config.question_to_qformer) or cfg.init_from is None:
        return None
    from transformers import AutoTokenizer

    folder = Path(cfg.init_from)
    source = folder / "qformer_tokenizer" if (folder / "qformer_tokenizer").is_dir() else folder
    return AutoTokenizer.from_pretrained(str(source)) if (source / "tokenizer_config.json").exists() else None


class Stage2Objective(nn.Module):
    """One forward = the LM loss of a batch, through the soft prompt. A module, so DDP's hooks see it."""

    def __init__(self, model: Blip2Model):
        super().__init__()
        self.model = model
        self.lora = lora.has_adapters(model.language_model)

    def forward(self, pixels, input_ids, attention_mask, labels, decoder_attention_mask=None,
                qformer_ids=None, qformer_mask=None) -> torch.Tensor:
        # Pixels (B, 3, S, S) run the frozen tower; cached frozen features (B, N, Dv) skip it.
        if self.lora:  # the frozen LLM stays in eval mode; its adapters' dropout follows ours
            lora.set_adapter_dropout(self.model.language_model, self.training)
        feats = self.model.image_features_from_cache(pixels) if pixels.ndim == 3 else self.model.encode_image(pixels)  # (B, N, Dv)
        kw = {} if decoder_attention_mask is None else {"decoder_attention_mask": decoder_attention_mask}
        qtext = (qformer_ids, qformer_mask) if qformer_ids is not None else None
        return self.model.lm_loss(feats, input_ids, attention_mask, labels, qformer_text=qtext, **kw)


def llm_dtype(cfg: Stage2Config, device: torch.device, reloaded: bool) -> torch.dtype | None:
    """The dtype the frozen LLM is cast to for training, or None to keep its own. `reloaded`: its weights come
    from `language.pretrained` at every load rather than from our checkpoints."""
    name = cfg.llm_dtype
    if name == "auto":
        name = cfg.precision if device.type == "cuda" and reloaded else "fp32"
    return PRECISIONS[name]


def mixed_records(cfg: Stage2Config, root: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`data`'s records plus every `mix` file's, as one VQA-format list. Image paths stay relative to `data`'s
    image root for a file that shares it (a feature cache keys images so), else they become absolute."""
    out = as_vqa_records(records, None, cfg.data.clean_text)
    for i, src in enumerate(cfg.mix):
        if not src.path:
            raise ConfigError(f"mix[{i}].path is empty: give the annotation file")
        src_root = src.image_root or str(Path(src.path).parent)
        more = read_records(src.format, src.path, src.annotations)
        check_images(more, src_root, src.path)  # wrong files fail here, before the model is built
        same = Path(src_root).absolute() == Path(root).absolute()
        out += as_vqa_records(more, None if same else src_root, cfg.data.clean_text)
    return out


def check_lora(cfg: Stage2Config, reloaded: bool | None = None) -> None:
    """LoRA settings that cannot work: from the config alone (reloaded None), then knowing whether the LLM is
    read from `language.pretrained` at every load."""
    opts = cfg.lora
    if opts.r < 0:
        raise ConfigError(f"lora.r must be 0 (off) or a positive rank, got {opts.r}")
    if opts.r == 0 and (opts.quantize != "none" or opts.merge):
        raise ConfigError("lora.quantize and lora.merge need adapters: set lora.r (e.g. lora.r=8)")
    if opts.quantize == "4bit" and opts.merge:
        raise ConfigError("lora.merge cannot fold adapters into a 4-bit LLM exactly: export the adapters "
                          "(lora.merge=false); blip2.load merges them into the full-precision LLM")
    if opts.quantize == "4bit" and reloaded is False:
        raise ConfigError("lora.quantize: 4bit needs an LLM read from `language.pretrained`: an LLM stored in "
                          "the checkpoint would have to be saved back quantized")


def quantized_llm(model: Blip2Model, cfg: Stage2Config, device: torch.device):
    """QLoRA's frozen base (Dettmers et al. 2023): the LLM read again from `language.pretrained` through
    transformers' bitsandbytes loader, NF4 with double quantization, computing in the autocast dtype (bf16 for
    fp32 runs), placed whole on `device`. The adapters added afterwards stay float32."""
    from blip2.models.language import check_quantize, load_pretrained_language_model

    lang = model.config.language
    if lang.gguf_file:
        raise ConfigError("lora.quantize: 4bit needs a transformers-format LLM; GGUF files are dequantized on the "
                          "CPU (drop lora.quantize)")
    if device.type != "cuda":
        raise ConfigError(f"lora.quantize: 4bit (QLoRA) needs a CUDA GPU (device={device}): bitsandbytes' 4-bit "
                          "layers do not train on the CPU; drop lora.quantize to train LoRA in full precision")
    try:
        check_quantize("4bit", device)  # bitsandbytes installed?
    except ValueError as err:
        raise ConfigError(f"lora.quantize: {err}") from None
    compute = PRECISIONS[cfg.precision] if cfg.precision != "fp32" else torch.bfloat16
    return load_pretrained_language_model(lang, compute, {"": device}, quantize="4bit")


def add_lora(model: Blip2Model, cfg: Stage2Config) -> None:
    """Inject fresh adapters into the frozen LLM (models/language/lora.py)."""
    llm = model.language_model
    config = lora.lora_config(llm, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets,
                              base_model=model.config.language.pretrained)
    lora.add_adapters(llm, config)
    n = sum(p.numel() for name, p in llm.named_parameters() if lora.is_adapter_param(name))
    log.info("LoRA r=%d alpha=%g on %s: %d adapter parameters", cfg.lora.r, cfg.lora.alpha,
             sorted(config.target_modules), n)


def export(model: Blip2Model, cfg: Stage2Config, folder: Path, tokenizer) -> Path:
    """output_dir/final: with LoRA, the adapters beside the bridge (peft's format under adapter/), or merged into
    the LLM (`lora.merge`; the LLM is then stored in the folder)."""
    qtok = qformer_tokenizer(cfg, model)
    if not lora.has_adapters(model.language_model):
        return save_model(model, folder, tokenizer=tokenizer, qformer_tokenizer=qtok)
    if cfg.lora.merge:
        return save_model(lora.merge_into_model(model), folder, tokenizer=tokenizer, qformer_tokenizer=qtok)
    with lora.adapters_detached(model.language_model):
        save_model(model, folder, tokenizer=tokenizer, qformer_tokenizer=qtok)
    lora.save_adapters(model.language_model, folder / lora.ADAPTER_DIR)
    return folder


def text_batch(batch: dict[str, Any], tokenizer, cfg: Stage2Config, encoder_decoder: bool, micro: int,
               eos_token_id: int | None = None, question_template: str | None = None) -> LMBatch:
    """The batch's texts -> LLM ids and labels (see the module docstring and data/collate.py).
    `question_template`: the model's own (InstructBLIP: "{}"), which `Blip2.ask` uses at inference; None: the
    LLM family's BLIP-2 template."""
    n = len(batch["index"])
    if cfg.instructions:  # one template per sample, drawn from (seed, micro-batch, index): resume draws the same
        prompts, targets, _ = instruction_batch(batch, cfg.seed, micro)
    elif "question" in batch:  # VQA
        template = cfg.prompt if cfg.prompt is not None else (question_template or vqa_template(encoder_decoder))
        if "{}" not in template:
            raise ConfigError(f"VQA data needs a prompt template with {{}} for the question, got {template!r}")
        # An empty question marks a caption record: the LLM reads only the soft prompt (mixed caption+VQA data).
        # Earlier chat turns (a record's `history`) come first, in Blip2.chat's format.
        histories = batch.get("history") or [()] * n
        prompts = [chat_prompt(h, q, template) if q else "" for q, h in zip(batch["question"], histories)]
        targets = list(batch["answer"])
    elif cfg.prompt:
        prompts, targets = [cfg.prompt] * n, list(batch["text"])
    elif encoder_decoder:  # prefix LM: a random split of each caption, seeded by item and position
        rngs = [random.Random(f"{cfg.seed}:{micro}:{int(i)}") for i in batch["index"]]
        splits = [split_caption(t, rng) for t, rng in zip(batch["text"], rngs)]
        prompts, targets = [s[0] for s in splits], [s[1] for s in splits]
    else:
        prompts, targets = [""] * n, list(batch["text"])
    if encoder_decoder:
        return encoder_decoder_batch(tokenizer, prompts, targets, cfg.data.max_text_len)
    # After a prompt the target starts a new word: " cat", as BPE tokenizers see it at generation time.
    targets = [" " + t if p else t for p, t in zip(prompts, targets)]
    return decoder_only_batch(tokenizer, prompts, targets, cfg.data.max_text_len, cfg.append_eos, eos_token_id)


def qformer_texts(batch: dict[str, Any], cfg: Stage2Config, micro: int) -> list[str]:
    """What the Q-Former of a `question_to_qformer` model reads for each sample, as `Blip2` feeds it at
    inference: the question (`ask`, `chat`), else the caption prompt (`caption(prompt=...)`: the instruction drawn
    for the sample, or the config's fixed caption prompt), else "" (an unprompted caption)."""
    n = len(batch["index"])
    questions = list(batch.get("question") or [""] * n)
    if cfg.instructions:
        prompts = instruction_batch(batch, cfg.seed, micro)[0]  # the same draws as text_batch's
    elif "question" not in batch and cfg.prompt:
        prompts = [cfg.prompt] * n
    else:  # a VQA template is not a caption prompt; T5's caption prefixes are targets' halves, not prompts
        prompts = [""] * n
    return [q if q else p for q, p in zip(questions, prompts)]


# ------------------------------------------------------------------------------------------------- run


def run(cfg: Stage2Config) -> TrainResult:
    return run_distributed(_train, cfg, cfg.device, cfg.cpu_threads)


def _train(cfg: Stage2Config, env: DistEnv) -> TrainResult:
    out = Path(cfg.output_dir)
    resume = ckpt.resume_folder(cfg.resume, cfg.output_dir)

    # -- setup: data files, model, tokenizer, dataset ------------------------------------------------------
    check_config(cfg)
    stream = cfg.data.format == "webdataset"  # tar shards, streamed: data.path = "shards/{000000..000999}.tar"
    if stream:
        if cfg.data.feature_cache:
            raise ConfigError("data.feature_cache reads annotation-file datasets, not webdataset shards")
        check_shards(cfg.data.path)  # wrong shards fail here, before the model is built
    else:
        root = cfg.data.image_root or str(Path(cfg.data.path).parent)
        records = read_records(cfg.data.format, cfg.data.path, cfg.data.annotations)
        check_images(records, root, cfg.data.path)  # wrong files fail here, before the model is built
        if cfg.mix:
            records = mixed_records(cfg, root, records)
    fmt = "vqa" if cfg.mix else cfg.data.format
    if fmt in ("vqa", "vqav2") and cfg.prompt is not None and "{}" not in cfg.prompt:
        raise ConfigError(f"VQA data needs a prompt template with {{}} for the question, got {cfg.prompt!r}")
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model, folder = build_model(cfg)
    tokenizer = load_tokenizer(cfg, folder, model)
    qtokenizer = qformer_tokenizer(cfg, model) if model.config.question_to_qformer else None
    if model.config.question_to_qformer and qtokenizer is None:
        raise ConfigError("question_to_qformer needs the Q-Former's tokenizer: init_from a stage-1 checkpoint")
    encoder_decoder = model.config.language.is_encoder_decoder
    eos_id = stop_token(model)
    if stream:  # `sampler` is then a StreamPosition: same set_position/batches_per_epoch (epoch logged as 0)
        loader, sampler = webdataset_loader(cfg.data.path, model.config.vision.image, cfg.batch_size, env.world_size,
                                            env.rank, cfg.seed, cfg.data.num_workers, env.device.type == "cuda",
                                            train=cfg.data.augment, clean_text=cfg.data.clean_text, check=False)
    else:
        dataset = build_dataset(fmt, cfg.data.path, root, model.config.vision.image, records=records,
                                train=cfg.data.augment, seed=cfg.seed, clean_text=cfg.data.clean_text,
                                features=FeatureCache.for_model(cfg.data.feature_cache, model))
        loader, sampler = make_loader(dataset, cfg.batch_size, env.world_size, env.rank, cfg.seed, collate,
                                      cfg.data.num_workers, pin_memory=env.device.type == "cuda")

    try:
        validator = build_validator(cfg.val, model)  # reads the validation set now: bad paths fail before compute
    except ValueError as err:
        raise ConfigError(f"val: {err}") from None
    # -- setup: optimisation, resume --------------------------------------------------------------------------
    model.set_gradient_checkpointing(cfg.grad_checkpointing)
    reloaded = model.config.language is not None and model.config.language.pretrained is not None
    check_lora(cfg, reloaded)
    if cfg.lora.quantize == "4bit":  # before the move: the full-precision LLM never goes to the GPU
        model.language_model = quantized_llm(model, cfg, env.device)
        model.freeze_frozen_parts()
    model.to(env.device).train()
    half = llm_dtype(cfg, env.device, reloaded)
    if half is not None and hasattr(model, "language_model") and cfg.lora.quantize == "none":
        model.language_model.to(half)  # frozen: no optimizer state, no master weights needed
    if cfg.lora.r:  # before the optimizer, in the same order on every run: resume finds the same parameters
        add_lora(model, cfg)
    step, micro, skipped = 0, 0, 0
    state = None
    if resume is not None:
        weights, state = ckpt.load_checkpoint(resume)
        ckpt.load_trainable(model, weights, skip=lora.is_adapter_param)
        adapters = resume / lora.ADAPTER_DIR
        if cfg.lora.r and not adapters.is_dir():
            raise ConfigError(f"resume: {resume} holds no LoRA adapters but lora.r={cfg.lora.r}: resume with the "
                              "run's own settings")
        if adapters.is_dir():
            if not cfg.lora.r:
                raise ConfigError(f"resume: {resume} holds LoRA adapters: resume with the run's lora settings")
            lora.load_adapters(model.language_model, adapters, inject=False)
        step, micro = int(state["step"]), int(state["micro_batches"])
        skipped = int(state.get("skipped_images", 0)) if env.is_main else 0  # a global count: summed over ranks
    objective = wrap_ddp(Stage2Objective(model), env, cfg.find_unused_parameters)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr, cfg.warmup_lr)
    scaler = grad_scaler(cfg.precision, env.device)
    seed_everything(cfg.seed + 1 + env.rank)  # dropout: different on every rank
    if state is not None:
        restore_training_state(state, env, optimizer, scheduler, scaler, {}, to_dict(cfg))
        log.info("resumed from %s at step %d", resume, step)

    def save(at: int) -> Path:
        extra = {"skipped_images": sum_over_ranks(skipped, env), "config": to_dict(cfg)}
        st = training_state(env, optimizer, scheduler, scaler, micro, {}, extra)
        path = out / "checkpoints" / ckpt.checkpoint_name(at)
        if env.is_main:
            adapters = None
            if cfg.lora.r:  # the adapters in peft's format, under the checkpoint's manifest
                adapters = lambda folder: lora.save_adapters(model.language_model, folder / lora.ADAPTER_DIR)  # noqa: E731
            path = ckpt.save_checkpoint(out / "checkpoints", at, ckpt.trainable_state(model, skip=lora.is_adapter_param),
                                        st, cfg.keep_last, extra=adapters)
        barrier(env)
        return path

    # -- loop ------------------------------------------------------------------------------------------------
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    logger = MetricsLogger(out, enabled=env.is_main, tensorboard=cfg.tensorboard,
                           resume_step=step if resume is not None else None)
    result = TrainResult(out, first_step=step, last_step=step)
    batches = micro_batches(loader, sampler, start=micro)
    global_batch = cfg.batch_size * env.world_size * cfg.grad_accum
    speed, started = Throughput(), time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="stage 2", unit="step", disable=not (cfg.progress and env.is_main))
    while step < end:
        total = 0.0
        for k in range(cfg.grad_accum):
            batch = next(batches)
            micro += 1
            skipped += batch["skipped"]
            text = text_batch(batch, tokenizer, cfg, encoder_decoder, micro, eos_id, model.config.question_template)
            dec_mask = text.decoder_attention_mask.to(env.device) if text.decoder_attention_mask is not None else None
            qformer = {}
            if qtokenizer is not None:  # the question ("" for captions) for the Q-Former, as at inference
                enc = qtokenizer(qformer_texts(batch, cfg, micro), return_tensors="pt", padding="longest", truncation=True,
                                 max_length=cfg.data.max_text_len)
                qformer = {"qformer_ids": enc["input_ids"].to(env.device), "qformer_mask": enc["attention_mask"].to(env.device)}
            with no_sync(objective, sync=k == cfg.grad_accum - 1):
                with autocast(cfg.precision, env.device):
                    loss = objective(batch["pixels"].to(env.device), text.input_ids.to(env.device),
                                     text.attention_mask.to(env.device), text.labels.to(env.device), dec_mask,
                                     **qformer)
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach()) / cfg.grad_accum
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = clip_and_step(model, optimizer, scaler, cfg.grad_clip)
        scheduler.step()
        step += 1

        total = mean_over_ranks({"loss": total}, env)["loss"]  # this step's loss on the global batch
        result.losses.append(total)
        samples_per_s = speed.update(global_batch)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        if step % cfg.log_every == 0 or step == end:
            record = {"loss": total, "lr": lr, "samples_per_s": samples_per_s,
                      "epoch": micro // sampler.batches_per_epoch, "skipped_images": sum_over_ranks(skipped, env)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            logger.log(step, record)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            result.checkpoint = save(step)
        if validator is not None and ((cfg.val.every and step % cfg.val.every == 0) or step == end):
            if env.is_main:
                with autocast(cfg.precision, env.device):
                    scores = validator(model, tokenizer, qformer_tokenizer(cfg, model))
                logger.log(step, scores)
                result.validation.append({"step": step, **scores})
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            barrier(env)
    bar.close()
    elapsed = time.perf_counter() - started

    # -- save --------------------------------------------------------------------------------------------------
    result.last_step = step
    result.skipped_images = sum_over_ranks(skipped, env)
    if result.skipped_images:
        log.warning("%d unreadable image(s) were skipped (replaced by the next readable item)", result.skipped_images)
    done = step - result.first_step
    result.steps_per_s = done / elapsed if done else 0.0
    result.samples_per_s = result.steps_per_s * global_batch
    logger.close()
    if env.is_main:
        if cfg.export and step == cfg.steps:
            result.final_dir = export(model, cfg, out / "final", tokenizer)
        if cfg.plot and logger.path.exists():
            result.plot = plot_losses(read_metrics(logger.path), out / "loss.png", title="stage 2")
    barrier(env)
    model.eval()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # a bad key or value in the config is a user's mistake too: one line, no traceback
        cfg = parse_args(Stage2Config, argv, prog="blip2 train stage2", description=__doc__.split("\n\n")[0])
        result = run(cfg)
    except (ConfigError, ModelConfigError, DatasetError, CheckpointError, ckpt.CheckpointDamagedError,
            lora.LoraError, FileNotFoundError) as err:
        print(f"blip2 train stage2: error: {err}", file=sys.stderr)
        return 1
    if result.losses:
        print(f"stage 2: steps {result.first_step}->{result.last_step}, loss {result.losses[0]:.4f} -> "
              f"{result.losses[-1]:.4f}, {result.samples_per_s:.1f} samples/s; output in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
