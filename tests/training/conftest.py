"""Tiny tokenizers, images and annotation files for the training tests (everything under tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models as tm

COLORS = ["red", "green", "blue"]
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # every training test (tests/conftest.py)
    yield


def shape_image(color: str, shape: str, size: int = 40, seed: int = 0) -> Image.Image:
    """A coloured shape on a pale background, with a little noise."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[color]
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


def write_images(folder: Path, n: int) -> list[tuple[str, str, str]]:
    """n images under folder/images; returns (relative path, colour, shape)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        color, shape = COLORS[i % 3], SHAPES[(i // 3) % 3]
        rel = f"images/{i:03d}.png"
        shape_image(color, shape, seed=i).save(folder / rel)
        out.append((rel, color, shape))
    return out


def write_pairs(folder: Path, n: int = 8, name: str = "pairs.jsonl") -> Path:
    rows = [{"image": rel, "text": [f"a {c} {s}", f"a photo of a {c} {s}"] if i % 2 else f"a {c} {s}."}
            for i, (rel, c, s) in enumerate(write_images(folder, n))]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_vqa(folder: Path, n: int = 8, name: str = "vqa.jsonl") -> Path:
    rows = []
    for i, (rel, c, s) in enumerate(write_images(folder, n)):
        if i % 2:
            rows.append({"image": rel, "question": "what color is this ?", "answers": [c, c, "blue"]})
        else:
            rows.append({"image": rel, "question": "what shape is this ?", "answers": [s]})
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for kind in ("bert", "opt", "t5"):
        tm.word_tokenizer(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def without_dropout(cfg):
    """A model config with the Q-Former's dropout off (over-fitting and exactness tests)."""
    import dataclasses

    q = dataclasses.replace(cfg.qformer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return dataclasses.replace(cfg, qformer=q)


def save_tiny_checkpoint(folder: Path, language: str | None = None, seed: int = 0, llm_std: float | None = None,
                         dropout: bool = True) -> Path:
    """A tiny model saved in our checkpoint layout with its tokenizer(s). `llm_std` gives the frozen LLM's
    weight matrices N(0, llm_std): a random LLM with transformers' 0.02 init is nearly uniform whatever
    its input, so a soft prompt can barely move it."""
    from blip2.convert.checkpoint import save_model
    from blip2.models.blip2 import Blip2Model

    cfg = tm.our_config(language)
    torch.manual_seed(seed)
    model = Blip2Model(cfg if dropout else without_dropout(cfg))
    if llm_std is not None:
        with torch.no_grad():
            for p in model.language_model.parameters():
                if p.ndim > 1:
                    p.normal_(0, llm_std)
    if language is None:
        save_model(model, folder, qformer_tokenizer=tm.word_tokenizer("bert"))
    else:
        save_model(model, folder, tokenizer=tm.word_tokenizer(language))
    return folder


def losses_close(a, b, tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))
