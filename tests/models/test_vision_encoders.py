"""One suite over every VisionEncoder adapter (STYLE: one interface per kind of part)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, SiglipVisionConfig

import tiny_models as tm
from blip2.models.config import VisionConfig
from blip2.models.vision import VisionEncoder, build_vision_encoder

TINY_VIT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=30, patch_size=6)

CONFIGS = {
    "blip2": VisionConfig(kind="blip2", hf_config=tm.vision_config().to_dict()),
    "clip": VisionConfig(kind="clip", hf_config=CLIPVisionConfig(**TINY_VIT).to_dict(), feature_layer=-2),
    "siglip": VisionConfig(kind="siglip", hf_config=SiglipVisionConfig(**TINY_VIT).to_dict()),
    "efficientnet_lite0": VisionConfig(kind="efficientnet_lite0"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def encoder(request):
    cfg = CONFIGS[request.param]
    return request.param, build_vision_encoder(cfg, load_pretrained=request.param == "efficientnet_lite0")


def test_interface(encoder):
    kind, enc = encoder
    assert isinstance(enc, VisionEncoder)
    pixels = torch.randn(2, 3, enc.image_size, enc.image_size)
    with torch.no_grad():
        feats = enc(pixels)
    assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[2] == enc.width
    # Features end with the trainable post-LN: per-token mean ~0 before its affine (identity at init here).
    assert all(p.startswith("post_layernorm") for p in enc.trainable_prefixes)


def test_frozen_inside_blip2(encoder):
    kind, enc = encoder
    from blip2.models.blip2 import Blip2Model

    cfg = tm.our_config("opt")
    model = Blip2Model(cfg)
    model.vision_model = enc
    model.freeze_frozen_parts()
    model.train()
    trainable = {n for n, p in model.vision_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("post_layernorm") for n in trainable)
    assert not model.vision_model.training or kind == "efficientnet_lite0" and not enc.backbone.training
    assert not model.language_model.training and not any(p.requires_grad for p in model.language_model.parameters())


def test_clip_uses_second_last_layer():
    enc = build_vision_encoder(CONFIGS["clip"]).eval()
    pixels = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        hidden = enc.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.allclose(enc(pixels), enc.post_layernorm(hidden[-2]))
