"""Many questions about one image share the keys/values of its soft prompt (issue 13): `generate_shared` gives
the tokens of the plain path (every row prefilled whole) on tiny random OPT and Llama, greedy, beam and seeded
sampling, batched and left-padded, with one or several distinct prefixes; the LLM really receives only the
uncached positions; Flan-T5 falls back to the plain path."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import blip2
from blip2.inference.pipeline import Blip2
from blip2.models.language import kv_cache

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = 4
QUESTIONS = ["what color is this ?", "what ?", "is it a big red circle on the square ?", "what shape is it ?", "two ?"]
SETTINGS = [
    {"num_beams": 1, "max_new_tokens": 6},
    {"num_beams": 3, "max_new_tokens": 6, "length_penalty": -1.0},
    {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Blip2]:
    root = tmp_path_factory.mktemp("shared")
    out = {}
    for kind in ("opt", "llama", "t5"):
        tm.save_generation_model(root / kind, kind, num_queries=QUERIES, seed=5)
        out[kind] = blip2.load(root / kind)
    return out


def _inputs(model: Blip2, images: int, questions=QUESTIONS):
    feats = model.encode_images(tm.images(images, seed=2))
    soft = model.soft_prompts(feats)  # (U, Q, H)
    prompts = [f"Question: {q} Answer:" for q in questions]
    tokens = model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (tokens["attention_mask"] == 0).any(), "the batch must be left-padded"
    return soft, tokens["input_ids"], tokens["attention_mask"]


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "beams", "beams-2-returned"])
@pytest.mark.parametrize("rows", [[0, 0, 0, 0, 0], [0, 1, 0, 2, 1]], ids=["one-image", "three-images"])
def test_shared_prefix_tokens_equal_the_plain_path(models, kind, settings, rows):
    model = models[kind]
    soft, ids, mask = _inputs(model, max(rows) + 1)
    rows = torch.tensor(rows)
    lm = model.model.lm
    gen = {**settings, "pad_token_id": model.tokenizer.pad_token_id}
    assert kv_cache.rows_per_sequence(lm.model, gen) == max(settings["num_beams"], settings.get("num_return_sequences", 1))
    with torch.no_grad():
        shared = lm.generate_shared(soft, rows, ids, mask, **gen)
        plain = lm.generate(soft[rows], ids, mask, **gen)
    assert torch.equal(shared, plain), (shared, plain)
    assert (plain != model.tokenizer.pad_token_id).sum() > plain.shape[0]  # real tokens, not only ends


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_seeded_sampling_draws_the_same_tokens(models, kind):
    model = models[kind]
    soft, ids, mask = _inputs(model, 1)
    rows = torch.zeros(len(QUESTIONS), dtype=torch.long)
    lm = model.model.lm
    gen = {"do_sample": True, "top_k": 8, "num_return_sequences": 2, "max_new_tokens": 6,
           "pad_token_id": model.tokenizer.pad_token_id}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)
        shared = lm.generate_shared(soft, rows, ids, mask, **gen)
        torch.manual_seed(3)
        plain = lm.generate(soft[rows], ids, mask, **gen)
    assert torch.equal(shared, plain)


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_ask_many_questions_equals_the_unshared_batch(models, kind, beams):
    model = models[kind]
    image = tm.images(1, seed=7)[0]
    gen = model._generation({"num_beams": beams, "max_new_tokens": 6}, {})
    answers = model.ask(image, QUESTIONS, num_beams=beams, max_new_tokens=6)
    soft = model.soft_prompts(model.encode_images([image]))
    plain = model._generate(soft.expand(len(QUESTIONS), -1, -1), [f"Question: {q} Answer:" for q in QUESTIONS], gen)
    assert answers == plain
    assert answers == [model.ask(image, q, num_beams=beams, max_new_tokens=6)[0] for q in QUESTIONS]


@pytest.mark.parametrize("beams", [1, 3])
def test_the_llm_receives_each_prefix_once_and_one_position_per_beam(models, beams):
    """A forward hook records (rows, positions) of every LLM pass: the prefixes once (U rows x Q), the
    questions but their last token on B rows, then generate's prefill of one position on B x beams rows."""
    model = models["llama"]
    soft, ids, mask = _inputs(model, 2)
    rows = torch.tensor([0, 1, 1, 0, 1])
    passes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        passes.append(tuple(x.shape[:2]))

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.lm.generate_shared(soft, rows, ids, mask, num_beams=beams, max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    batch, length = ids.shape
    assert passes[:4] == [(2, QUERIES), (batch, length - 1), (batch * beams, 1), (batch * beams, 1)], passes


def test_flan_t5_falls_back_to_the_plain_path(models):
    model = models["t5"]
    feats = model.encode_images(tm.images(2, seed=2))
    soft = model.soft_prompts(feats)
    prompts = [f"Question: {q} Short answer:" for q in QUESTIONS]
    rows = torch.tensor([0, 1, 0, 1, 1])
    gen = model._generation({"num_beams": 3, "max_new_tokens": 5}, {})
    assert model._generate(soft, prompts, gen, rows=rows) == model._generate(soft[rows], prompts, gen)
    assert model.ask(tm.images(1)[0], QUESTIONS, num_beams=3, max_new_tokens=5) == [
        model.ask(tm.images(1)[0], q, num_beams=3, max_new_tokens=5)[0] for q in QUESTIONS
    ]


def test_settings_that_bring_their_own_cache_keep_the_plain_path(models):
    lm = models["llama"].model.language_model
    assert kv_cache.rows_per_sequence(lm, {"num_beams": 1}) == 1
    assert kv_cache.rows_per_sequence(lm, {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0}) is None
    assert kv_cache.rows_per_sequence(lm, {"cache_implementation": "static"}) is None
    assert kv_cache.rows_per_sequence(lm, {"use_cache": False}) is None
    assert not kv_cache.can_keep(models["t5"].model.language_model)
