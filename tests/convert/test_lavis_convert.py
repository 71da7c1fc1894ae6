"""`convert_lavis`: a LAVIS-layout .pth (as released: no frozen weights) -> our folder, same outputs."""

from __future__ import annotations

import torch
import tiny_models as tm
from transformers import Blip2ForConditionalGeneration

import blip2
from blip2.convert.checkpoint import CheckpointError, save_model
from blip2.convert.lavis import ours_to_lavis
from blip2.convert.lavis_convert import convert_lavis


def test_stage2_opt_checkpoint_without_frozen_parts(tmp_path):
    hf_dir = tmp_path / "hf"
    hf = tm.save_generation_model(hf_dir, "opt", num_queries=4, cross_freq=2)
    llm_dir = tmp_path / "llm"
    hf.language_model.save_pretrained(llm_dir)
    tm.word_tokenizer("opt").save_pretrained(llm_dir)

    trainable = {k: v for k, v in hf.state_dict().items() if not k.startswith(("language_model.", "vision_model."))}
    trainable["vision_model.post_layernorm.weight"] = hf.state_dict()["vision_model.post_layernorm.weight"]
    trainable["vision_model.post_layernorm.bias"] = hf.state_dict()["vision_model.post_layernorm.bias"]
    lavis = ours_to_lavis(trainable, "blip2_opt", require_frozen=False)
    assert "opt_proj.weight" in lavis and "ln_vision.weight" in lavis
    torch.save({"model": lavis}, tmp_path / "blip2_opt.pth")

    out = convert_lavis(tmp_path / "blip2_opt.pth", tmp_path / "out", llm=str(llm_dir), vision=str(hf_dir),
                        qformer_heads=4)
    ours = blip2.load(out)
    pixels = ours.images(tm.images(2))
    ids = torch.tensor([[2, 10, 11]] * 2)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, input_ids=torch.cat([torch.full((2, 4), 4), ids], 1)).logits
        got = ours.model.lm_logits(ours.model.encode_image(pixels), ids, torch.ones_like(ids))
    assert (got - expected).abs().max() < 1e-5
    # The converted folder is a transformers checkpoint too.
    again = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(again(pixel_values=pixels, input_ids=torch.cat([torch.full((2, 4), 4), ids], 1)).logits,
                              expected, atol=1e-5)


def test_saved_model_loads_in_transformers_and_back(tmp_path):
    hf_dir = tmp_path / "hf"
    tm.save_generation_model(hf_dir, "t5", num_queries=4)
    ours = blip2.load(hf_dir)
    save_model(ours.model, tmp_path / "saved", tokenizer=ours.tokenizer)
    theirs = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    reloaded = blip2.load(tmp_path / "saved")
    a, b = ours.model.state_dict(), reloaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = theirs.state_dict()
    assert all(torch.equal(a[k], t[k]) for k in t)


def test_incomplete_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    import safetensors.torch as st

    hf_dir = tmp_path / "hf"
    tm.save_generation_model(hf_dir, "opt")
    sd = st.load_file(hf_dir / "model.safetensors")
    del sd["language_projection.weight"]
    sd["bogus.weight"] = torch.zeros(1)
    st.save_file(sd, hf_dir / "model.safetensors")
    try:
        blip2.load(hf_dir)
    except CheckpointError as err:
        assert "bogus.weight" in str(err)
    else:
        raise AssertionError("an unexpected key must fail")
    del sd["bogus.weight"]
    st.save_file(sd, hf_dir / "model.safetensors")
    try:
        blip2.load(hf_dir)
    except CheckpointError as err:
        assert "language_projection.weight" in str(err)
    else:
        raise AssertionError("a missing key must fail")
