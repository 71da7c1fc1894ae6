"""Training recipes: one readable script each (STYLE "Recipes, not a trainer").

`run_recipe("stage1", ["--config", "configs/stage1.yaml", "steps=100"])` runs a recipe's `main`; the CLI's
`blip2 train NAME ...` calls this. Recipes never import each other.

The paper's fine-tunes (REFERENCE §5) are the stage recipes with their own default config, not new scripts:

    caption    = stage2 + configs/finetune_caption.yaml    (prompt "a photo of", lr 1e-5, β (0.9, 0.999))
    vqa        = stage2 + configs/finetune_vqa.yaml        (prompt "Question: {} Answer:")
    retrieval  = stage1 + configs/finetune_retrieval.yaml  (ITC + ITM + ITG, image_id positives)

`blip2 train caption [--config mine.yaml] [key=value ...]` runs the stage-2 recipe with the default file
first: the user's `--config` files are layered over it (mappings merge key by key, training/config.py) and
`key=value` overrides come last, so `blip2 train caption init_from=Salesforce/blip2-opt-2.7b
data.path=coco/annotations/captions_train2014.json` is a whole fine-tune. `--print-config` shows the result.
Under torchrun, name the file yourself: `torchrun ... -m blip2.recipes.stage2 --config
configs/finetune_caption.yaml ...` is the same run.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

RECIPES = {
    "stage1": "blip2.recipes.stage1",
    "stage2": "blip2.recipes.stage2",
    "cache-features": "blip2.recipes.cache_features",
    "default-model": "blip2.recipes.default_model",
}
# name -> (the recipe it runs, its default config file in the repository's configs/ folder)
FINETUNES = {
    "caption": ("stage2", "finetune_caption.yaml"),
    "vqa": ("stage2", "finetune_vqa.yaml"),
    "retrieval": ("stage1", "finetune_retrieval.yaml"),
}
CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # src/blip2/recipes -> the repository root


def default_config(name: str) -> Path:
    """The default config file of fine-tune `name` (configs/finetune_*.yaml beside src/)."""
    path = CONFIGS / FINETUNES[name][1]
    if not path.is_file():
        raise FileNotFoundError(f"the {name} fine-tune's default config {path} is missing: run from a checkout of "
                                f"the repository, or use `blip2 train {FINETUNES[name][0]} --config FILE` with a copy")
    return path


def run_recipe(name: str, argv: list[str] | None = None) -> int:
    """Run recipe `name` with command-line arguments `argv`; returns the exit code."""
    if name in FINETUNES:
        recipe, _ = FINETUNES[name]
        try:
            base = default_config(name)
        except FileNotFoundError as err:
            print(f"blip2 train {name}: error: {err}", file=sys.stderr)
            return 1
        argv = list(sys.argv[1:] if argv is None else argv)
        argv = ["--config", str(base), *argv]  # the user's --config files layer over it
        return importlib.import_module(RECIPES[recipe]).main(argv)
    if name not in RECIPES:
        known = sorted([*RECIPES, *FINETUNES])
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(known)})")
    return importlib.import_module(RECIPES[name]).main(argv)


__all__ = ["FINETUNES", "RECIPES", "default_config", "run_recipe"]
