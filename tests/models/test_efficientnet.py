"""The packaged EfficientNet-Lite0 tower: strict real weights, frozen backbone, (B, 49, 1280) features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from blip2.data.images import ImageProcessor
from blip2.models.config import ImageConfig
from blip2.models.vision.base import VisionEncoder
from blip2.models.vision.efficientnet import (
    EfficientNetLite0Encoder,
    efficientnet_lite0_image_config,
    pretrained_weights_path,
)

GRACE_HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
# ImageNet classes for a portrait of Grace Hopper in naval uniform.
PLAUSIBLE = {400: "academic gown", 457: "bow tie", 652: "military uniform", 667: "mortarboard", 834: "suit",
             906: "Windsor tie"}


@pytest.fixture(scope="module")
def encoder() -> EfficientNetLite0Encoder:
    torch.manual_seed(0)
    return EfficientNetLite0Encoder()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)


def test_honours_the_vision_encoder_protocol(encoder: EfficientNetLite0Encoder, pixels: torch.Tensor) -> None:
    assert isinstance(encoder, VisionEncoder)
    assert (encoder.width, encoder.image_size, encoder.trainable_prefixes) == (1280, 224, ("post_layernorm",))
    assert encoder.post_layernorm.eps == 1e-5
    with torch.no_grad():
        assert encoder(pixels).shape == (2, 49, 1280)


def test_image_config_is_the_packaged_preprocessing() -> None:
    cfg = efficientnet_lite0_image_config()
    assert cfg == EfficientNetLite0Encoder.image_config()
    assert (cfg.size, cfg.mean, cfg.std, cfg.resize, cfg.resize_to, cfg.resample) == (
        224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "shorter_side_crop", 256, "bicubic")
    assert ImageConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_pretrained_weights_load_strictly_and_exactly(encoder: EfficientNetLite0Encoder) -> None:
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    ours = encoder.backbone.state_dict()
    assert set(ours) == set(state)  # no missing, no unexpected keys
    assert all(torch.equal(ours[k], state[k]) for k in state)


def test_only_post_layernorm_trains(encoder: EfficientNetLite0Encoder, pixels: torch.Tensor) -> None:
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable == ["post_layernorm.weight", "post_layernorm.bias"]
    assert all(n.startswith(encoder.trainable_prefixes) for n in trainable)
    encoder.zero_grad()
    encoder(pixels[:1]).square().mean().backward()
    assert encoder.post_layernorm.weight.grad is not None
    assert all(p.grad is None for p in encoder.backbone.parameters())


def test_backbone_stays_in_eval_mode(encoder: EfficientNetLite0Encoder, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        before = encoder(pixels)
        encoder.train()
        assert encoder.training and encoder.post_layernorm.training
        assert not any(m.training for m in encoder.backbone.modules())
        after = encoder(pixels)  # BatchNorm uses its running stats, which do not move
        encoder.eval()
    assert torch.equal(before, after)


def test_features_are_the_package_feature_map_as_tokens(
    encoder: EfficientNetLite0Encoder, pixels: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    package_model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pretrained_weights_path())
    package_model.eval()
    capsys.readouterr()  # the package prints on load
    with torch.no_grad():
        fmap = package_model.extract_features(pixels)  # (B, 1280, 7, 7)
        assert torch.equal(encoder.feature_map(pixels), fmap)
        feats = encoder(pixels)
    # token k is spatial position (k // 7, k % 7), normalised over the 1280 channels
    expected = torch.nn.functional.layer_norm(fmap[:, :, 3, 5], (1280,), eps=1e-5)
    torch.testing.assert_close(feats[:, 3 * 7 + 5], expected)


def test_without_pretrained_weights_a_state_dict_fills_it(
    encoder: EfficientNetLite0Encoder, pixels: torch.Tensor
) -> None:
    blank = EfficientNetLite0Encoder(pretrained=False)
    assert not torch.equal(blank.backbone._conv_stem.weight, encoder.backbone._conv_stem.weight)
    assert not blank.backbone.training and not any(p.requires_grad for p in blank.backbone.parameters())
    blank.load_state_dict(encoder.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(blank(pixels), encoder(pixels))


def test_wrong_pixel_size_is_a_clear_error(encoder: EfficientNetLite0Encoder) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\).*\(1, 3, 256, 256\)"):
        encoder(torch.zeros(1, 3, 256, 256))


def test_classifies_a_real_photo_with_our_preprocessing(encoder: EfficientNetLite0Encoder) -> None:
    pixels = ImageProcessor(encoder.image_config())(GRACE_HOPPER)
    with torch.no_grad():
        probs = encoder.backbone(pixels).softmax(-1)[0]  # the package's own classifier head
    top = probs.topk(5)
    print("grace_hopper.jpg top-5:", [(int(i), round(float(p), 3)) for p, i in zip(top.values, top.indices)])
    assert torch.isclose(probs.sum(), torch.tensor(1.0))
    assert int(top.indices[0]) in PLAUSIBLE and 652 in top.indices.tolist()  # military uniform in the top 5
