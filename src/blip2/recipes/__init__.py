"""Training recipes: one readable script each (STYLE "Recipes, not a trainer").

`run_recipe("stage1", ["--config", "configs/stage1.yaml", "steps=100"])` runs a recipe's `main`; the CLI's
`blip2 train NAME ...` is meant to call this. Recipes never import each other.
"""

from __future__ import annotations

import importlib

RECIPES = {
    "stage1": "blip2.recipes.stage1",
    "stage2": "blip2.recipes.stage2",
    "cache-features": "blip2.recipes.cache_features",
    "default-model": "blip2.recipes.default_model",
}


def run_recipe(name: str, argv: list[str] | None = None) -> int:
    """Run recipe `name` with command-line arguments `argv`; returns the exit code."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    return importlib.import_module(RECIPES[name]).main(argv)


__all__ = ["RECIPES", "run_recipe"]
