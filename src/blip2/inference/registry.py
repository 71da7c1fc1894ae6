"""Model names users can pass to `blip2.load` besides folders and hub names."""

from __future__ import annotations

import os
from pathlib import Path

# The embedded default model ships inside the package (trainable weights + references to packaged parts).
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "default"
# Its LLM (SmolLM2) takes 8,192 positions, but the bridge was trained on prompts of a few dozen tokens: a longer
# prompt only buys minutes of compute and a meaningless answer, so the default model caps prompts here.
DEFAULT_MODEL_PROMPT_TOKENS = 512


def resolve_name(name_or_path: str | os.PathLike) -> str | os.PathLike:
    if str(name_or_path) == "default":
        if not (DEFAULT_DIR / "config.json").exists():
            raise FileNotFoundError("the default model is not bundled in this install (src/blip2/default is empty)")
        return DEFAULT_DIR
    return name_or_path
