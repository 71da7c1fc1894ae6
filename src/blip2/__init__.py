"""BLIP-2 in readable PyTorch: `blip2.load(name_or_path)` then caption / ask / chat / itm / retrieve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from blip2.inference.pipeline import Blip2


def load(name_or_path: Any, device: Any = None, dtype: Any = None, batch_size: int = 8, **options: Any) -> Blip2:
    """Load a checkpoint folder, a hub name, or "default" -> a `Blip2` (caption, ask, chat, itm, ...).
    `options`: those of `blip2.inference.pipeline.load` (max_prompt_tokens, device_map, max_memory,
    offload_folder, quantize)."""
    from blip2.inference.pipeline import load as _load

    return _load(name_or_path, device=device, dtype=dtype, batch_size=batch_size, **options)


def __getattr__(name: str) -> Any:
    # Heavy imports (torch, transformers) only when used: `blip2 --help` must stay instant.
    if name == "Blip2":
        from blip2.inference.pipeline import Blip2

        return Blip2
    if name in ("Blip2Config", "QFormerConfig", "VisionConfig", "LanguageConfig", "ImageConfig"):
        from blip2.models import config

        return getattr(config, name)
    if name == "Blip2Model":
        from blip2.models.blip2 import Blip2Model

        return Blip2Model
    raise AttributeError(name)


__all__ = ["load", "Blip2", "Blip2Model", "Blip2Config", "__version__"]
