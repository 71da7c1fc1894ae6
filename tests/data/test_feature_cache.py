"""The feature cache gives the same Q-Former outputs as running the encoder."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models as tm
from blip2.data.feature_cache import FeatureCache, FeatureCacheError, encoder_fingerprint
from blip2.data.images import ImageProcessor
from blip2.models.blip2 import Blip2Model
from blip2.recipes.cache_features import cache_features


def test_cache_equals_encoder(tmp_path):
    torch.manual_seed(0)
    model = Blip2Model(tm.our_config("opt")).eval()
    tm._randomize(model, 3)
    names = []
    for i, im in enumerate(tm.images(5)):
        im.save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    folder = cache_features(model, tmp_path, names + names[:2], tmp_path / "cache", batch_size=2, progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert index["count"] == 5 and len(index["shards"]) == 1
    cache = FeatureCache(folder, encoder_fingerprint(model))
    pixels = ImageProcessor(model.config.vision.image)([tmp_path / n for n in names])
    with torch.no_grad():
        direct = model.query(model.encode_image(pixels)).hidden
        cached = torch.stack([cache[n] for n in names])
        from_cache = model.query(model.image_features_from_cache(cached)).hidden
    # The only difference is the float16 storage of the frozen features.
    assert cached.dtype == torch.float16
    assert (direct - from_cache).abs().max() < 1e-2
    with torch.no_grad():
        exact = model.query(model.image_features_from_cache(model.frozen_image_features(pixels).half())).hidden
    assert torch.equal(exact, from_cache)


def test_cache_refuses_other_encoder_and_unfinished(tmp_path):
    model = Blip2Model(tm.our_config("opt")).eval()
    tm.images(1)[0].save(tmp_path / "a.png")
    folder = cache_features(model, tmp_path, ["a.png"], tmp_path / "cache", progress=False)
    with pytest.raises(FeatureCacheError, match="not of this model"):
        FeatureCache(folder, "blip2:something-else")
    (folder / "index.json").unlink()
    with pytest.raises(FeatureCacheError, match="not a finished"):
        FeatureCache(folder)
