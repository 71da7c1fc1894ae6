"""Frozen vision towers from transformers, behind the VisionEncoder interface (DESIGN §4).

- `Blip2VisionTower`: BLIP-2's EVA ViT in transformers' layout (`Blip2VisionModel`); its own
  `post_layernorm` is BLIP-2's `ln_vision` (REFERENCE §1), so published checkpoints load unchanged.
- `HFVisionTower`: any other transformers vision model with hidden states (CLIP, SigLIP, ...); features are
  the hidden state `feature_layer` (-2 for CLIP ViT-L, REFERENCE §4) followed by our trainable LayerNorm.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, Blip2VisionConfig, CLIPVisionModel, SiglipVisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer, Blip2VisionModel


def _layer_output(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden) if _LAYER_TAKES_ONLY_HIDDEN else layer(hidden, None)  # transformers 5 / 4 signatures
    return out[0] if isinstance(out, tuple) else out


_LAYER_TAKES_ONLY_HIDDEN = "attention_mask" not in inspect.signature(Blip2EncoderLayer.forward).parameters


class Blip2VisionTower(nn.Module):
    trainable_prefixes = ("post_layernorm",)
    # When the ViT is unfrozen (stage-1 `trainable` naming its layers), recompute each layer in backward
    # instead of keeping its activations: the recipes set this from `grad_checkpointing`.
    gradient_checkpointing = False

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        config = Blip2VisionConfig(**hf_config)
        model = Blip2VisionModel(config)
        # Keep transformers' submodules (and so its parameter names) but not its output plumbing.
        self.embeddings = model.embeddings
        self.encoder = model.encoder
        self.post_layernorm = model.post_layernorm
        self.width = config.hidden_size
        self.image_size = config.image_size

    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's output before the trainable `post_layernorm`: what a feature cache stores."""
        x = self.embeddings(pixel_values)  # (B, 1 + (S/p)^2, D)
        if not (self.gradient_checkpointing and torch.is_grad_enabled()
                and any(p.requires_grad for p in self.encoder.parameters())):
            return self.encoder(inputs_embeds=x).last_hidden_state
        for layer in self.encoder.layers:  # the encoder's own loop, one checkpoint per layer
            x = checkpoint(_layer_output, layer, x, use_reentrant=False)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.frozen_features(pixel_values))


_TOWERS = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}


class HFVisionTower(nn.Module):
    trainable_prefixes = ("post_layernorm",)

    def __init__(self, kind: str, hf_config: dict[str, Any], feature_layer: int = -1, pretrained: str | None = None):
        super().__init__()
        cls = _TOWERS.get(kind, AutoModel)
        if pretrained is not None:
            self.tower = cls.from_pretrained(pretrained)
        else:
            config = AutoConfig.for_model(**hf_config)
            self.tower = cls(config) if cls is not AutoModel else AutoModel.from_config(config)
        cfg = self.tower.config
        self.width = int(cfg.hidden_size)
        self.image_size = int(cfg.image_size)
        self.feature_layer = feature_layer
        self.post_layernorm = nn.LayerNorm(self.width, eps=1e-5)  # LAVIS ln_vision eps (REFERENCE §1)

    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]  # (B, N, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.frozen_features(pixel_values))
