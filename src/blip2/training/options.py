"""The config fields every recipe shares: data, optimisation, the run itself. Each recipe's config
dataclass extends `TrainConfig` with its model fields (see recipes/stage1.py, recipes/stage2.py).

Defaults follow the paper's pretraining (REFERENCE §5): AdamW β (0.9, 0.98), weight decay 0.05, peak
lr 1e-4 with linear warmup then cosine to `min_lr`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    format: Literal["pairs", "coco", "vqa", "vqav2", "webdataset"] = "pairs"
    # the annotation file (pairs/vqa JSONL, COCO captions JSON, VQAv2 questions JSON), or for webdataset the
    # tar shards, brace-expanded: "shards/{000000..000999}.tar" (data/webdataset.py)
    path: str = ""
    annotations: str | None = None  # VQAv2 only: the annotations JSON
    image_root: str = ""  # image paths in `path` are relative to this folder ("" = the file's folder)
    max_text_len: int = 32  # tokens (REFERENCE §1, §3: max_txt_len 32)
    clean_text: bool = True  # LAVIS caption/question normalisation (data/datasets.py)
    augment: bool = True  # RandomResizedCrop(0.5-1) + flip; false = the eval resize
    feature_cache: str = ""  # a `blip2 cache-features` folder: read frozen features instead of images
    num_workers: int = 0  # DataLoader worker processes per rank


@dataclass
class ValConfig:
    """Validation during training (blip2.eval.validation): off unless `task` is set."""

    task: Literal["", "vqa", "caption", "retrieval"] = ""  # vqa / caption need an LLM (stage 2)
    data: str = ""  # as `blip2 eval --data`: a file, a VQAv2 folder, or e.g. easy-vqa:test
    image_root: str = ""  # "" = the data file's folder
    limit: int = 200  # the first N questions / images: a quick signal, not the final evaluation
    every: int = 0  # validate every N steps; 0 = only at the end of the run
    batch_size: int = 16


@dataclass
class LoraOptions:
    """LoRA adapters on the frozen LLM (peft; models/language/lora.py): off while r is 0. With them on, only the
    adapters and the bridge train; checkpoints keep the adapters in peft's format under `adapter/`."""

    r: int = 0  # adapter rank; 0 = no LoRA (the LLM stays wholly frozen, as in BLIP-2)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapters' input (the frozen LLM itself keeps no dropout)
    targets: list[str] = field(default_factory=list)  # module names; [] = the family's: q_proj/v_proj (OPT, Llama), q/v (T5)
    merge: bool = False  # the export folds the adapters into the LLM (a plain checkpoint, loads without peft)
    quantize: Literal["none", "4bit"] = "none"  # 4bit = QLoRA: the frozen LLM in NF4 (CUDA + bitsandbytes)


@dataclass
class TrainConfig:
    output_dir: str = "runs/blip2"
    data: DataConfig = field(default_factory=DataConfig)
    val: ValConfig = field(default_factory=ValConfig)
    # optimisation
    steps: int = 1000  # optimizer updates in the whole run
    batch_size: int = 8  # per process and micro-batch: global batch = batch_size * world size * grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    warmup_lr: float = 1e-6  # the lr at step 0 of the warmup (LAVIS warmup_lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 0.0  # global grad-norm clip; 0 = off (LAVIS does not clip)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds loss scaling
    # the run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: int = 0  # torch intra-op threads; 0 = torch's default. On a shared CPU, 1 avoids thrashing
    seed: int = 42
    log_every: int = 10
    save_every: int = 1000  # checkpoint every N steps (and always at the end); 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    resume: str | None = None  # "latest" (in output_dir/checkpoints) or a checkpoint folder
    stop_after: int | None = None  # end this job after this step (checkpointed), e.g. for time limits
    export: bool = True  # write output_dir/final in the checkpoint layout `blip2.load` reads
    tensorboard: bool = False
    grad_checkpointing: bool = False  # recompute Q-Former (and unfrozen ViT) layers in backward: less memory, ~30% more time
    progress: bool = True  # tqdm bar on the main process
    plot: bool = True  # output_dir/loss.png at the end
    find_unused_parameters: bool = False  # DDP option, for models with parameters a step does not use
