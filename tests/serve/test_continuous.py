"""Continuous batching (serve/continuous.py): every request's tokens equal `generate` for that request alone,
whoever its batch mates are and whenever it joins or they leave."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

from blip2.serve.continuous import ContinuousDecoder
from tiny_models import _randomize, text_config

WIDTH = 32
# generate's own warnings (default length; penalty on new tokens only), which the decoder repeats on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using the model-agnostic default", "ignore:Passing `repetition_penalty`"
)


@pytest.fixture(scope="module", params=["opt", "llama"])
def lm(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(text_config(request.param)).eval()
    _randomize(model, 0)
    return model


def prompts(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    """Unpadded [soft prompt; prompt] stand-ins, (T, H) each, of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(n, WIDTH, generator=gen) for n in lengths]


def reference(lm, embeds: torch.Tensor, settings: dict, eos: set[int] | None = None) -> list[int]:
    """What CausalLanguageModel.generate gives for this request alone (seeded the way the engine seeds)."""
    settings = dict(settings)
    seed = settings.pop("seed", None)
    if eos is not None:
        settings["eos_token_id"] = sorted(eos)
    if seed is not None:
        torch.manual_seed(seed)
    mask = torch.ones(1, embeds.shape[0], dtype=torch.long)
    pad = lm.config.pad_token_id
    out = lm.generate(inputs_embeds=embeds[None], attention_mask=mask, pad_token_id=pad, **settings)
    return out[0].tolist()


def run(decoder: ContinuousDecoder, schedule: dict[int, list[tuple]], cancel: dict[int, list] | None = None,
        steps: int = 60):
    """Add requests at their steps, run `steps` steps; returns tokens per key, the step each key finished
    and the largest batch seen. Checks each step gives each running key at most one token."""
    tokens: dict = {}
    finished: dict = {}
    largest = 0
    for step in range(steps):
        for key, embeds, settings in schedule.get(step, []):
            decoder.add(key, embeds, settings)
            tokens[key] = []
        for key in (cancel or {}).get(step, []):
            decoder.cancel(key)
        out = decoder.step()
        assert len({key for key, _, _ in out}) == len(out)
        for key, token, done in out:
            assert key not in finished
            tokens[key].append(token)
            if done:
                finished[key] = step
        largest = max(largest, decoder.active)
    assert decoder.active == 0 and decoder.waiting == 0
    return tokens, finished, largest


def test_greedy_tokens_equal_generate_as_requests_join_and_leave(lm):
    r1, r2, r3, r4 = prompts(5, 9, 3, 7, seed=21)  # a seed where the story below happens on both models
    # An EOS the model really emits: r3's second greedy token. r3 asks for min_new_tokens past it.
    eos = {reference(lm, r3, dict(max_new_tokens=3, min_new_tokens=3))[1]}
    settings = {
        "r1": dict(max_new_tokens=6),  # leaves at step 5, the step r3 and r4 join
        "r2": dict(max_new_tokens=12),
        "r3": dict(max_new_tokens=12, min_new_tokens=5),
        "r4": dict(max_new_tokens=10),
    }
    schedule = {0: [("r1", r1, settings["r1"])], 3: [("r2", r2, settings["r2"])],
                5: [("r3", r3, settings["r3"]), ("r4", r4, settings["r4"])]}
    tokens, finished, largest = run(ContinuousDecoder(lm, max_batch=4, eos_token_ids=eos), schedule)
    embeds = {"r1": r1, "r2": r2, "r3": r3, "r4": r4}
    for key in embeds:
        assert tokens[key] == reference(lm, embeds[key], settings[key], eos), key
        # The last token finishes the row: EOS (returned) or the length limit.
        assert tokens[key][-1] in eos or len(tokens[key]) == settings[key]["max_new_tokens"]
        assert not set(tokens[key][:-1]) & eos
    # The story: r1 runs alone, then with r2, and leaves by length at step 5 as r3 and r4 join; rows also
    # leave by EOS.
    assert len(tokens["r1"]) == 6 and finished["r1"] == 5 and len(tokens["r2"]) >= 5 and largest >= 3
    assert any(tokens[k][-1] in eos and len(tokens[k]) < settings[k]["max_new_tokens"] for k in ("r2", "r3"))
    # min_new_tokens mattered: without it r3 stops at that EOS after two tokens.
    assert len(reference(lm, r3, dict(max_new_tokens=12), eos)) <= 2 < 5 <= len(tokens["r3"])


def test_model_eos_and_default_length(lm):
    """No override: the model's generation config decides EOS and the default length, as in generate."""
    reqs = prompts(4, 8, 6, 2, seed=5)
    schedule = {2 * i: [(i, e, {})] for i, e in enumerate(reqs)}
    tokens, _, _ = run(ContinuousDecoder(lm, max_batch=8), schedule)
    for i, e in enumerate(reqs):
        assert tokens[i] == reference(lm, e, {})


def test_logits_processors_match_generate(lm):
    """Greedy with a repetition penalty (on new tokens only, as generate with inputs_embeds) next to plain
    rows."""
    reqs = prompts(6, 3, 8, seed=2)
    settings = [dict(max_new_tokens=10, repetition_penalty=1.5), dict(max_new_tokens=8),
                dict(max_new_tokens=9, repetition_penalty=1.3, min_new_tokens=4)]
    schedule = {step: [(i, reqs[i], settings[i])] for i, step in enumerate((0, 1, 4))}
    tokens, _, _ = run(ContinuousDecoder(lm, max_batch=4), schedule)
    for i in range(3):
        assert tokens[i] == reference(lm, reqs[i], settings[i])
    assert tokens[0] != reference(lm, reqs[0], dict(max_new_tokens=10))  # the penalty changed the tokens


def test_seeded_sampling_equals_generate_alone_whatever_the_batch(lm):
    a, b, c = prompts(5, 7, 4, seed=3)
    sampled = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    expected = reference(lm, a, sampled)
    assert expected != reference(lm, a, dict(max_new_tokens=10))  # it really sampled
    alone, _, _ = run(ContinuousDecoder(lm, max_batch=4), {0: [("s", a, sampled)]})
    mates = {0: [("g", b, dict(max_new_tokens=12))],
             2: [("s", a, sampled), ("t", c, dict(max_new_tokens=10, do_sample=True, seed=3))]}
    crowded, _, _ = run(ContinuousDecoder(lm, max_batch=4), mates)
    assert alone["s"] == crowded["s"] == expected
    assert crowded["t"] == reference(lm, c, dict(max_new_tokens=10, do_sample=True, seed=3))
    assert crowded["g"] == reference(lm, b, dict(max_new_tokens=12))


def test_full_batch_queues_and_admits_as_rows_leave(lm):
    reqs = prompts(3, 6, 4, 9, 5)
    settings = [dict(max_new_tokens=n) for n in (3, 7, 5, 4, 6)]
    decoder = ContinuousDecoder(lm, max_batch=2)
    tokens, _, largest = run(decoder, {0: [(i, e, s) for i, (e, s) in enumerate(zip(reqs, settings))]})
    assert largest == 2
    for i, e in enumerate(reqs):
        assert tokens[i] == reference(lm, e, settings[i])


def test_cancel_drops_running_and_queued_requests(lm):
    reqs = prompts(4, 7, 5, seed=4)
    s = dict(max_new_tokens=10, min_new_tokens=10)  # no early EOS: the cancel is what ends "b"
    decoder = ContinuousDecoder(lm, max_batch=2)
    tokens, finished, _ = run(decoder, {0: [("a", reqs[0], s), ("b", reqs[1], s), ("c", reqs[2], s)]},
                              cancel={3: ["b", "c"], 4: ["gone"]})
    assert len(tokens["b"]) == 3 and "b" not in finished and tokens["c"] == []
    assert tokens["a"] == reference(lm, reqs[0], s)


def test_cache_keeps_only_columns_live_rows_use(lm):
    long, short = prompts(12, 3, seed=6)
    s = dict(max_new_tokens=8, min_new_tokens=8)
    decoder = ContinuousDecoder(lm, max_batch=2)
    decoder.add("long", long, dict(max_new_tokens=2, min_new_tokens=2))
    decoder.add("short", short, s)
    decoder.step()  # both prefilled; the batch cache is 12 columns wide
    assert decoder._mask.shape == (2, 12)
    decoder.step()  # "long" leaves: the 9 columns only it used go
    assert decoder.active == 1 and decoder._mask.shape == (1, 4) and bool(decoder._mask.all())
    assert [layer.keys.shape[2] for layer in decoder._cache.layers] == [4, 4]


def test_refuses_what_stays_on_generate(lm):
    decoder = ContinuousDecoder(lm, max_batch=2)
    (e,) = prompts(3)
    with pytest.raises(ValueError, match="greedy or sampling"):
        decoder.add("beam", e, dict(num_beams=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.add("empty", e, dict(max_new_tokens=0))
    with pytest.raises(ValueError, match="unsupported"):
        decoder.add("odd", e, dict(not_a_setting=1))
    with pytest.raises(ValueError, match=r"\(T >= 1, 32\)"):
        decoder.add("wide", torch.zeros(3, 7), {})
    decoder.add("x", e, {})
    with pytest.raises(ValueError, match="already"):
        decoder.add("x", e, {})
    t5 = T5ForConditionalGeneration(text_config("t5"))
    with pytest.raises(ValueError, match="encoder-decoder"):
        ContinuousDecoder(t5, max_batch=2)
