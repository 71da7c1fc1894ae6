"""The beam-search prefill runs once per input row (fast_decode.py) and changes no token: `CausalLanguageModel.generate`
(which uses it) gives the tokens of transformers' plain `generate` on the same inputs, on tiny random OPT and Llama,
greedy, beam and seeded sampling, batched and left-padded; the LLM really prefills B rows instead of B * beams;
the repeated cache and logits are bit-identical to the full prefill's; it steps aside for a non-empty cache, for
rows that are not copies, and for Flan-T5 (whose decoder prefill is one token)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from transformers import DynamicCache

import blip2
from blip2.inference.pipeline import Blip2
from blip2.models.language.fast_decode import prefill_once_per_row, repeated_rows

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what color is this ?", "is it a big red circle on the square ?", "what ?"]
SETTINGS = {
    "greedy": {"num_beams": 1, "max_new_tokens": 6},
    "beams": {"num_beams": 3, "max_new_tokens": 6},
    "beams-length-penalty": {"num_beams": 4, "max_new_tokens": 5, "min_new_tokens": 5, "length_penalty": -1.0},
    "beams-2-returned": {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5},
    "sampling-2-returned": {"do_sample": True, "num_return_sequences": 2, "max_new_tokens": 5, "top_k": 0},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Blip2]:
    root = tmp_path_factory.mktemp("fast")
    out = {}
    for kind in ("opt", "llama", "t5"):
        tm.save_generation_model(root / kind, kind, num_queries=4, seed=7)
        out[kind] = blip2.load(root / kind)
    return out


def _inputs(model: Blip2):
    soft = model.soft_prompts(model.encode_images(tm.images(len(QUESTIONS), seed=3)))  # (B, Q, H)
    prompts = [f"Question: {q} Answer:" for q in QUESTIONS]
    tokens = model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (tokens["attention_mask"] == 0).any(), "the batch must be left-padded"
    return soft, tokens["input_ids"], tokens["attention_mask"]


class FirstForwardRows:
    """Records the batch size of the decoder's forward calls."""

    def __init__(self, module: torch.nn.Module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        self.rows.append(int(x.shape[0]))


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_tokens_equal_plain_generate(models, kind, name):
    model = models[kind]
    lm = model.model.lm
    soft, ids, mask = _inputs(model)
    gen = {**SETTINGS[name], "pad_token_id": model.tokenizer.pad_token_id}
    embeds, full_mask = lm._inputs(soft, ids, mask)
    spy = FirstForwardRows(lm.model.get_decoder())
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            fast = lm.generate(soft, ids, mask, **gen)  # the path Blip2.caption / ask take
            first_fast = spy.rows[0]
            spy.rows.clear()
            torch.manual_seed(0)
            plain = lm.model.generate(inputs_embeds=embeds, attention_mask=full_mask, **gen)  # transformers alone
            first_plain = spy.rows[0]
    finally:
        spy.handle.remove()
    assert "forward" not in vars(lm.model), "the patched forward must not outlive generate"
    assert torch.equal(fast, plain), (fast, plain)
    assert (plain != model.tokenizer.pad_token_id).sum() > plain.shape[0]  # real tokens, not only ends
    copies = repeated_rows(lm.model, gen)
    assert first_plain == len(QUESTIONS) * copies
    # The prefill ran once per row (plus one spare copy of the last row, see fast_decode.py).
    assert first_fast == (len(QUESTIONS) + 1 if copies > 1 else len(QUESTIONS))


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_repeated_prefill_is_bit_identical(models, kind):
    """The first forward's logits and key/value cache equal those of the full B * beams prefill bit for bit."""
    model = models[kind]
    lm = model.model.lm
    soft, ids, mask = _inputs(model)
    embeds, full_mask = lm._inputs(soft, ids, mask)
    beams = 3
    kwargs = {"inputs_embeds": embeds.repeat_interleave(beams, 0), "attention_mask": full_mask.repeat_interleave(beams, 0)}
    with torch.no_grad():
        plain_cache = DynamicCache(config=lm.model.config)
        plain = lm.model(**kwargs, cache=plain_cache, use_cache=True).logits
        fast_cache = DynamicCache(config=lm.model.config)
        with prefill_once_per_row(lm.model, beams):
            fast = lm.model(**kwargs, cache=fast_cache, use_cache=True).logits
    # Beam search reads only the first copy of each row at its first step (the other beams start at -1e9) and
    # then continues every beam from that copy's cache. The full batch's very last copy may differ from the
    # first in the last bit (elementwise kernels' scalar tail, fast_decode.py), so compare with the first copies.
    first = lambda t: t[::beams].repeat_interleave(beams, 0)  # noqa: E731
    assert torch.equal(fast, first(plain))
    assert torch.equal(fast[:-1], plain[:-1])
    for a, b in zip(plain_cache.layers, fast_cache.layers):
        assert torch.equal(first(a.keys), b.keys) and torch.equal(first(a.values), b.values)


def test_steps_aside_for_a_kept_cache_and_for_rows_that_differ(models):
    model = models["opt"]
    lm = model.model.lm
    soft, ids, mask = _inputs(model)
    embeds, full_mask = lm._inputs(soft, ids, mask)
    spy = FirstForwardRows(lm.model.get_decoder())
    try:
        with torch.no_grad(), prefill_once_per_row(lm.model, 3):
            lm.model(inputs_embeds=embeds, attention_mask=full_mask)  # 3 different rows: not copies of 1
        with torch.no_grad():
            cache = DynamicCache(config=lm.model.config)
            rep = {"inputs_embeds": embeds.repeat_interleave(2, 0), "attention_mask": full_mask.repeat_interleave(2, 0)}
            lm.model(inputs_embeds=rep["inputs_embeds"][:, :4], attention_mask=rep["attention_mask"][:, :4],
                     cache=cache, use_cache=True)
            with prefill_once_per_row(lm.model, 2):  # a non-empty cache: the rows may differ in its past
                lm.model(inputs_embeds=rep["inputs_embeds"][:, 4:], attention_mask=rep["attention_mask"],
                         cache=cache, use_cache=True)
    finally:
        spy.handle.remove()
    assert spy.rows == [3, 6, 6]


def test_t5_and_several_threads_are_left_alone(models):
    opt = models["opt"].model.lm.model
    with prefill_once_per_row(opt, 3):
        assert "forward" in vars(opt)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a row's numbers may then depend on the batch around it (fast_decode.bit_exact)
    try:
        with prefill_once_per_row(opt, 3):
            assert "forward" not in vars(opt)
    finally:
        torch.set_num_threads(threads)
    model = models["t5"]
    lm = model.model.lm
    with prefill_once_per_row(lm.model, 3):
        assert "forward" not in vars(lm.model)
    soft, ids, mask = _inputs(model)
    gen = {**SETTINGS["beams"], "pad_token_id": model.tokenizer.pad_token_id}
    with torch.no_grad():
        a = model.model.generate(soft_prompt=soft, input_ids=ids, attention_mask=mask, **gen)
        with prefill_once_per_row(lm.model, 3):
            b = model.model.generate(soft_prompt=soft, input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(a, b)


def test_repeated_rows_follows_the_settings(models):
    lm = models["opt"].model.lm.model
    assert repeated_rows(lm, {}) == max(lm.generation_config.num_beams or 1, lm.generation_config.num_return_sequences or 1)
    assert repeated_rows(lm, {"num_beams": 5}) == 5
    assert repeated_rows(lm, {"num_beams": 1, "do_sample": True, "num_return_sequences": 4}) == 4
