"""The interface every frozen image encoder honours (DESIGN §4, STYLE "one interface per kind of part")."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class VisionEncoder(Protocol):
    """pixels (B, 3, S, S) -> image features (B, N, width).

    The features are what the Q-Former cross-attends to. Every adapter ends with a LayerNorm named
    `post_layernorm` (BLIP-2's `ln_vision`, REFERENCE §1): it is the one part of the tower that stays
    trainable, so `trainable_prefixes` names it.
    """

    width: int
    image_size: int
    trainable_prefixes: tuple[str, ...]

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The output before `post_layernorm`: it never changes in training, so it can be cached."""
        ...
