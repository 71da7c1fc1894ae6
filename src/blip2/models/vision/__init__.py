"""Frozen image encoders: `build_vision_encoder(cfg)` picks the adapter for `cfg.kind`."""

from __future__ import annotations

from torch import nn

from blip2.models.config import VisionConfig
from blip2.models.vision.base import VisionEncoder


def build_vision_encoder(cfg: VisionConfig, load_pretrained: bool = False) -> nn.Module:
    """Build the tower. `load_pretrained` fetches frozen weights from `cfg.pretrained` (a hub name, folder
    or package); otherwise they are left for a checkpoint to fill."""
    if cfg.kind == "blip2":
        from blip2.models.vision.hf import Blip2VisionTower

        return Blip2VisionTower(cfg.hf_config or {})
    if cfg.kind == "efficientnet_lite0":
        from blip2.models.vision.efficientnet import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(pretrained=load_pretrained)
    if cfg.kind in ("clip", "siglip", "auto"):
        from blip2.models.vision.hf import HFVisionTower

        source = cfg.pretrained if load_pretrained else None
        return HFVisionTower(cfg.kind, cfg.hf_config or {}, cfg.feature_layer, pretrained=source)
    raise ValueError(f"unknown vision encoder kind {cfg.kind!r} (known: blip2, clip, siglip, auto, efficientnet_lite0)")


__all__ = ["VisionEncoder", "build_vision_encoder"]
