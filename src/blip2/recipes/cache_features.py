"""`blip2 cache-features`: run the frozen image encoder once over a dataset's images and store its outputs.

Training reads the cache instead of running the encoder when augmentation is off (eval transform): the
features are those before the trainable post-LN, so the cache stays valid while ln_vision trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blip2.data.feature_cache import FeatureCacheWriter, encoder_fingerprint
from blip2.data.images import ImageProcessor
from blip2.models.blip2 import Blip2Model


@torch.no_grad()
def cache_features(
    model: Blip2Model, image_root: str | os.PathLike, images: Sequence[str], out: str | os.PathLike,
    batch_size: int = 32, progress: bool = True,
) -> Path:
    """Encode each distinct image of `images` (paths relative to `image_root`) into a cache at `out`."""
    keys = list(dict.fromkeys(images))  # distinct, in first-seen order
    processor = ImageProcessor(model.config.vision.image)
    writer = FeatureCacheWriter(out, encoder_fingerprint(model))
    device = model.query_tokens.device
    dtype = next(model.vision_model.parameters()).dtype
    root = Path(image_root)
    for start in tqdm(range(0, len(keys), batch_size), desc="caching features", unit="batch", disable=not progress):
        chunk = keys[start : start + batch_size]
        pixels = processor([root / k for k in chunk]).to(device, dtype)
        writer.add(chunk, model.frozen_image_features(pixels))
    return writer.close()


def _images_of(data: str, fmt: str) -> tuple[str, list[str]]:
    from blip2.data import datasets

    readers = {"pairs": datasets.read_pairs_jsonl, "coco": datasets.read_coco_captions, "vqa": datasets.read_vqa_jsonl}
    if data.startswith("easy-vqa:"):
        import easy_vqa

        split = data.split(":", 1)[1]
        paths = (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()
        root = Path(next(iter(paths.values()))).parent
        return str(root), [Path(p).name for _, p in sorted(paths.items())]
    if fmt not in readers:
        raise ValueError(f"unknown data format {fmt!r} (known: {', '.join(readers)})")
    return str(Path(data).parent), [r["image"] for r in readers[fmt](data)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 cache-features", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint folder, hub name, 'default' or 'preset:default'")
    parser.add_argument("--data", required=True, help="annotation file (see --format) or easy-vqa:train|test")
    parser.add_argument("--format", default="pairs", help="pairs | coco | vqa (default: pairs)")
    parser.add_argument("--image-root", help="folder the annotation's image paths are relative to")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    root, images = _images_of(args.data, args.format)
    if args.model.startswith("preset:"):
        from blip2.convert.checkpoint import init_model
        from blip2.models import presets

        # Only the image encoder runs here: leave the (large) language model out of a preset.
        cfg = getattr(presets, f"{args.model.split(':', 1)[1]}_config")()
        model = init_model(dataclasses.replace(cfg, language=None))
    else:
        from blip2.convert.checkpoint import load_model
        from blip2.inference.registry import resolve_name

        model, _ = load_model(resolve_name(args.model))
    model.to(args.device).eval()
    # Cached features stand in for what the encoder computes at inference (often on CPU, in full fp32): no
    # TF32 convolutions/matmuls on GPU, whose rounding (~1e-3) would differ from it.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = cache_features(model, args.image_root or root, images, args.out, args.batch_size)
    print(f"cached {len(set(images))} images to {folder}")
    return 0
