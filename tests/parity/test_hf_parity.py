"""Parity with transformers' BLIP-2 classes on the same weights (DESIGN §6): tiny random checkpoints saved
to a folder, loaded by `blip2.load`, compared tensor by tensor and token by token."""

from __future__ import annotations

import pytest
import torch
import tiny_models as tm

import blip2

ATOL = 1e-5
CASES = [  # (LLM, queries, cross-attention frequency, Q-Former layers)
    ("opt", 4, 2, 3),
    ("opt", 6, 1, 2),
    ("llama", 4, 1, 2),
    ("llama", 6, 2, 3),
    ("t5", 4, 2, 2),
    ("t5", 6, 1, 2),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-q{c[1]}-x{c[2]}")
def pair(request, tmp_path_factory):
    kind, queries, cross, layers = request.param
    folder = tmp_path_factory.mktemp(f"{kind}{queries}{cross}")
    hf = tm.save_generation_model(folder, kind, num_queries=queries, cross_freq=cross, qformer_layers=layers)
    return kind, hf, blip2.load(folder)


def _hf_ids(kind: str, hf, prompt_ids: torch.Tensor) -> torch.Tensor:
    image = torch.full((prompt_ids.shape[0], hf.config.num_query_tokens), tm.image_token_index(kind))
    return torch.cat([image, prompt_ids], dim=1)


def test_forward_matches(pair):
    kind, hf, ours = pair
    pixels = ours.images(tm.images(3))
    prompt = ours.tokenizer(["what color is this ?"] * 3, return_tensors="pt")
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    hf_kwargs = {}
    if kind == "t5":
        decoder = torch.tensor([[0, 7, 8, 9]] * 3)
        hf_kwargs = {"decoder_input_ids": decoder}
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=_hf_ids(kind, hf, ids), **hf_kwargs)
        feats = ours.model.encode_image(pixels)
        query = ours.model.query(feats).hidden
        logits = ours.model.lm_logits(feats, ids, mask, **hf_kwargs)
    assert (feats - ref.vision_outputs.last_hidden_state).abs().max() <= ATOL
    assert (query - ref.qformer_outputs.last_hidden_state).abs().max() <= ATOL
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max() <= ATOL


@pytest.mark.parametrize("beams", [1, 5])
def test_generation_matches(pair, beams):
    kind, hf, ours = pair
    pixels = ours.images(tm.images(2, seed=1))
    prompt = ours.tokenizer(["a photo of"] * 2, return_tensors="pt")
    gen = {"max_new_tokens": 8, "num_beams": beams, "do_sample": False, "min_new_tokens": 2}
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=_hf_ids(kind, hf, prompt["input_ids"]), **gen)
        ours_ids = ours.model.generate(ours.model.encode_image(pixels), prompt["input_ids"], prompt["attention_mask"], **gen)
    if kind == "t5":
        ref = ref[:, 1:]  # drop the decoder start token
    else:
        ref = ref[:, _hf_ids(kind, hf, prompt["input_ids"]).shape[1] :]  # transformers returns the prompt too
    assert torch.equal(ours_ids, ref)
    # And through the user API: the same tokens, decoded.
    texts = ours.caption(tm.images(2, seed=1), prompt="a photo of", **gen)
    assert texts == [t.strip() for t in ours.tokenizer.batch_decode(ref, skip_special_tokens=True)]


def test_left_padding_equals_unpadded(pair):
    kind, _, ours = pair
    if kind == "t5":
        pytest.skip("encoder-decoder prompts are right padded and masked; covered by the forward test")
    images = tm.images(2, seed=2)
    questions = ["what color is this ?", "what ?"]
    batched = ours.ask(images, questions, num_beams=3, max_new_tokens=6)
    single = [ours.ask(im, q, num_beams=3, max_new_tokens=6)[0] for im, q in zip(images, questions)]
    assert batched == single


@pytest.fixture(scope="module", params=[(4, 2), (6, 1)], ids=["q4-x2", "q6-x1"])
def retrieval_pair(request, tmp_path_factory):
    queries, cross = request.param
    folder = tmp_path_factory.mktemp(f"itm{queries}{cross}")
    hf = tm.save_retrieval_model(folder, num_queries=queries, cross_freq=cross)
    return hf, blip2.load(folder)


def test_retrieval_scores_match(retrieval_pair):
    hf, ours = retrieval_pair
    images = tm.images(3, seed=3)
    texts = ["a red circle", "a photo of a dog on the picture", "blue"]
    pixels = ours.images(images)
    tokens = ours.qformer_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        itm_ref = hf(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                     use_image_text_matching_head=True).logits_per_image
        itc_ref = hf(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                     use_image_text_matching_head=False).logits_per_image
    itm = ours.itm(images, texts)
    assert torch.allclose(torch.tensor(itm), itm_ref.softmax(-1)[:, 1], atol=ATOL)
    assert torch.allclose(ours.similarity(images, texts), itc_ref, atol=ATOL)
