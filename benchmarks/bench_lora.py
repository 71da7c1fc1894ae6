"""LoRA vs the bridge alone on the default model (issue 14): the same stage-2 continuation from src/blip2/default
(SmolLM2-135M frozen), same seed, data and lr, with and without rank-8 adapters on q_proj/v_proj; 16 drawn shape
images captioned in a wording the model never saw ("circle of colour red"). Reports the per-step losses; the
question is how fast each one learns, not its speed (no timing is compared).

    python benchmarks/bench_lora.py [--steps 40] [--out benchmarks/results/lora_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.recipes.stage2 import Stage2Config, run
from blip2.training.options import DataConfig, LoraOptions

ROOT = Path(__file__).resolve().parents[1]
COLOURS, SHAPES = ["red", "green", "blue"], ["circle", "square", "triangle"]


def shape_image(colour: str, shape: str, size: int = 40, seed: int = 0) -> Image.Image:
    """A coloured shape on a pale background with a little noise (tests/training/conftest.py's images)."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[colour]
    yy, xx = np.mgrid[0:size, 0:size]
    c, r = size / 2, size / 3
    if shape == "circle":
        inside = (xx - c) ** 2 + (yy - c) ** 2 < r**2
    elif shape == "square":
        inside = (abs(xx - c) < r) & (abs(yy - c) < r)
    else:
        inside = (yy > c - r) & (yy < c + r) & (abs(xx - c) < (yy - (c - r)) / 2)
    arr = np.full((size, size, 3), 235, dtype=np.float64)
    arr[inside] = rgb
    arr += np.random.default_rng(seed).normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_data(folder: Path, n: int = 16) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = COLOURS[i % 3], SHAPES[(i // 3) % 3]
        shape_image(colour, shape, seed=i).save(folder / f"images/{i:03d}.png")
        rows.append({"image": f"images/{i:03d}.png", "text": f"{shape} of colour {colour}"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict = {"model": "src/blip2/default (SmolLM2-135M-Instruct frozen)", "steps": args.steps,
                    "batch_size": 8, "lr": 2e-4, "images": 16, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp))
        for name, opts in (("bridge", LoraOptions()), ("lora_r8", LoraOptions(r=8, alpha=16, dropout=0.0))):
            cfg = Stage2Config(output_dir=str(Path(tmp) / name), init_from=str(ROOT / "src/blip2/default"),
                               steps=args.steps, batch_size=8, lr=2e-4, min_lr=2e-4, log_every=5, save_every=0,
                               progress=False, plot=False, export=False, seed=0, cpu_threads=1, lora=opts,
                               data=DataConfig(path=str(data), augment=False))
            losses = run(cfg).losses
            result[name] = {"losses": [round(x, 4) for x in losses],
                            "mean_last5": round(sum(losses[-5:]) / 5, 4)}
            print(name, result[name]["mean_last5"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
