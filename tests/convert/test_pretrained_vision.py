"""Stage 1 from a published ViT: `vision.pretrained` naming a BLIP-2 checkpoint takes its `vision_model.*`
tensors (only those), for init_model and for loading our own checkpoints of such a model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny_models as tm
from blip2.convert.checkpoint import CheckpointError, init_model, load_model, read_state_dict, save_model
from blip2.models.config import VisionConfig


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published") / "blip2-opt-tiny"
    hf = tm.save_generation_model(folder, "opt", seed=3)
    return folder, {k: v.clone() for k, v in hf.vision_model.state_dict().items()}


def test_read_state_dict_keeps_only_the_prefix(published):
    folder, vision = published
    part = read_state_dict(folder, "vision_model.")
    assert set(part) == {f"vision_model.{k}" for k in vision}
    assert len(read_state_dict(folder)) > len(part)


def test_init_model_takes_the_published_vit_and_our_checkpoint_keeps_pointing_at_it(published, tmp_path):
    folder, vision = published
    cfg = tm.our_config(None)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=str(folder)))
    model = init_model(cfg)
    assert all(torch.equal(model.vision_model.state_dict()[k], v) for k, v in vision.items())
    assert not any(p.requires_grad for n, p in model.vision_model.named_parameters() if not n.startswith("post_layernorm"))

    with torch.no_grad():
        model.vision_model.post_layernorm.weight.add_(0.5)  # trained ln_vision: stored in our checkpoint
    save_model(model, tmp_path / "ours")
    stored = read_state_dict(tmp_path / "ours")
    assert not any(k.startswith("vision_model.encoder.") for k in stored)  # the frozen ViT stays where it is
    loaded, _ = load_model(tmp_path / "ours")
    assert torch.equal(loaded.vision_model.encoder.layers[0].mlp.fc1.weight, vision["encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(loaded.vision_model.post_layernorm.weight, model.vision_model.post_layernorm.weight)


def test_a_vit_that_does_not_fit_is_named(published):
    folder, _ = published
    cfg = tm.our_config(None)
    hf = {**cfg.vision.hf_config, "num_hidden_layers": 3}
    bad = dataclasses.replace(cfg, vision=VisionConfig(kind="blip2", hf_config=hf, image=cfg.vision.image, pretrained=str(folder)))
    with pytest.raises(CheckpointError, match="does not fit vision.hf_config: missing .*layers.2"):
        init_model(bad)


def test_a_hub_download_says_so_and_a_cached_one_is_silent(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    from blip2.convert.checkpoint import resolve

    calls = []

    def fake(name, allow_patterns=None, local_files_only=False):
        calls.append(local_files_only)
        if local_files_only and name == "someone/not-cached":
            raise FileNotFoundError("not in the cache")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with caplog.at_level("INFO", logger="blip2.convert"):
        assert resolve("someone/cached") == tmp_path
        assert "downloading" not in caplog.text and calls == [True]
        assert resolve("someone/not-cached") == tmp_path
    assert calls == [True, True, False]
    assert "downloading someone/not-cached from the Hugging Face hub" in caplog.text
