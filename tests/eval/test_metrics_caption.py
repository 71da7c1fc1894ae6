"""Caption metrics: our BLEU / CIDEr-D / ROUGE-L against pycocoevalcap, hand values, both backends.

Tolerances (measured, see the module docstring of blip2.eval.metrics.caption):
- same tokens, our scorers vs pycocoevalcap's: |diff| <= 1e-9 (measured 0.0 on this fixture);
- end to end, fallback (regex tokenizer) vs pycocoevalcap (PTB, Java) on clean captions: 1e-9
  (measured 0.0: the tokens are identical);
- end to end on captions full of rare tokens ("Mr.", "@home", "rock'n'roll", "?Yes"): measured up to
  0.057 (BLEU-3), 0.022 (ROUGE-L), 0.010 (CIDEr); we assert < 0.1.
"""

import math

import pytest

from blip2.eval.metrics import caption as cap
from blip2.eval.metrics.caption import (
    BACKEND_COCO,
    BACKEND_FALLBACK,
    bleu,
    caption_metrics,
    cider_d,
    rouge_l,
    simple_tokenize,
)

PREDS = {
    1: "A man riding a wave on top of a surfboard.",
    2: "Two dogs playing with a frisbee in the grass",
    3: "a kitchen with a stove and a refrigerator",
    4: "A plate of food with broccoli and rice.",
    5: "a red double-decker bus driving down the street",
    6: "The cat's sitting on a laptop, isn't it?",
}
REFS = {
    1: ["A surfer rides a large wave in the ocean.", "A man on a surfboard riding a wave.",
        "a person surfing on a big wave", "A surfer is riding a wave on his board.", "Man in wetsuit surfing a wave."],
    2: ["Two dogs play with a frisbee on the lawn.", "A pair of dogs chase a frisbee in a field.",
        "Dogs playing in the grass with a red frisbee", "two brown dogs running in grass",
        "The dogs are fighting over a frisbee."],
    3: ["A kitchen with a white stove and a fridge.", "A small kitchen with appliances and cabinets.",
        "a kitchen that has a stove, a sink and a refrigerator", "An empty kitchen with wooden cabinets.",
        "The kitchen is clean and has a refrigerator."],
    4: ["A plate with broccoli, rice and meat.", "A white plate topped with rice and vegetables.",
        "some food on a plate with broccoli", "A meal of chicken, rice and broccoli.",
        "Rice and broccoli on a dinner plate."],
    5: ["A red double-decker bus on a city street.", "A double decker bus driving down a road.",
        "a big red bus going down the street", "The red bus is driving past buildings.",
        "A London bus drives along the street."],
    6: ["A cat sitting on top of a laptop computer.", "The cat's lying on the keyboard of a laptop.",
        "a cat that is sitting on a laptop", "A grey cat isn't letting anyone use the laptop.",
        "Cat laying on an open laptop."],
}  # fmt: skip
FAST = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]  # everything but METEOR (10 s of Java)

needs_java = pytest.mark.skipif(
    cap.coco_unavailable_reason() is not None,
    reason=f"pycocoevalcap backend unavailable: {cap.coco_unavailable_reason()}",
)


def _tokenized():
    keys = list(PREDS)
    hyps = [simple_tokenize(PREDS[k]) for k in keys]
    refs = [[simple_tokenize(r) for r in REFS[k]] for k in keys]
    return keys, hyps, refs


def test_bleu_by_hand():
    # hyp "the cat sat" vs ref "the cat sat on the mat": p1 = p2 = p3 = 1, p4 = (0 + 1e-15)/(0 + 1e-9)
    # = 1e-6 (pycocoevalcap's smoothing), brevity penalty exp(1 - 6/3) = e^-1.
    b = bleu(["the cat sat"], [["the cat sat on the mat"]])
    assert b[:3] == pytest.approx([math.exp(-1)] * 3, rel=1e-9)
    assert b[3] == pytest.approx(1e-6**0.25 * math.exp(-1), rel=1e-6)
    # "closest" reference length: refs of 2 and 6 words for a 3-word hyp -> 2 (no brevity penalty).
    assert bleu(["the cat sat"], [["the cat", "the cat sat on the mat"]])[0] == pytest.approx(1.0)


def test_cider_d_by_hand():
    # Two images, so idf = log(2) - log(df) with df = 1 for every reference n-gram.
    # Image A: hyp == ref "a b": cosine 1 for 1- and 2-grams, 0 for 3-, 4-grams (none), no length
    # penalty -> mean(1, 1, 0, 0) / 1 ref x 10 = 5. Image B: no shared n-gram -> 0. Corpus: 2.5.
    mean, per_image = cider_d(["a b", "c d"], [["a b"], ["e f"]])
    assert per_image == pytest.approx([5.0, 0.0])
    assert mean == pytest.approx(2.5)
    # One image only: log(1) = 0 -> every weight is 0 -> CIDEr 0 (it needs a corpus), as pycocoevalcap.
    assert cider_d(["a b"], [["a b"]])[0] == 0.0


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c e") = 2: P = 2/3, R = 2/4; F = (1 + 1.2^2) P R / (R + 1.2^2 P).
    p, r = 2 / 3, 2 / 4
    assert rouge_l(["a c e"], [["a b c d"]]) == pytest.approx(2.44 * p * r / (r + 1.44 * p))


def test_scorers_equal_pycocoevalcap_on_same_tokens():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys, hyps, refs = _tokenized()
    gts = dict(zip(keys, refs))
    res = {k: [h] for k, h in zip(keys, hyps)}
    scorer = BleuScorer(n=4)
    for k in keys:
        scorer += (res[k][0], gts[k])
    ref_bleu, _ = scorer.compute_score(option="closest", verbose=0)
    assert bleu(hyps, refs) == pytest.approx(ref_bleu, abs=1e-9)
    ref_cider, ref_per_image = Cider().compute_score(gts, res)
    mean, per_image = cider_d(hyps, refs)
    assert mean == pytest.approx(ref_cider, abs=1e-9)
    assert per_image == pytest.approx(list(ref_per_image), abs=1e-9)
    assert rouge_l(hyps, refs) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)


@pytest.mark.parametrize(
    ("raw", "ptb"),
    [  # expected = what pycocoevalcap's PTB tokenizer + punctuation filter produce
        ("A man's hat.", "a man 's hat"),
        ("A DOG, A CAT; and a BIRD!", "a dog a cat and a bird"),
        ("I'D HE'LL we're can't won't isn't", "i 'd he 'll we 're ca n't wo n't is n't"),
        ("A woman holding an umbrella (red).", "a woman holding an umbrella -lrb- red -rrb-"),
        ("2x4 10-year-old 1990s 9:30 1,000 3.5", "2x4 10-year-old 1990s 9:30 1,000 3.5"),
        ("the 'best' \"dog\" -- ok...", "the best dog ok"),
        ("50% $5 #1 a&b", "50 % $ 5 # 1 a & b"),
        ("cannot gonna", "can not gon na"),
        ("u.s. army", "u.s. army"),
        ("", ""),
    ],
)
def test_simple_tokenize_matches_ptb_on_common_text(raw, ptb):
    assert simple_tokenize(raw) == ptb


def test_fallback_backend_is_labelled():
    result = caption_metrics(PREDS, REFS, backend="fallback")
    assert result.backend == BACKEND_FALLBACK
    assert list(result.scores) == FAST
    assert set(result.unavailable) == {"METEOR", "SPICE"}
    assert 0 < result.scores["Bleu_4"] < result.scores["Bleu_1"] <= 1
    assert result.scores["CIDEr"] > 0


def test_auto_falls_back_without_java(monkeypatch):
    monkeypatch.setattr(cap, "coco_unavailable_reason", lambda: "no `java` on PATH")
    assert caption_metrics(PREDS, REFS).backend == BACKEND_FALLBACK
    with pytest.raises(RuntimeError, match="no `java` on PATH"):
        caption_metrics(PREDS, REFS, backend="pycocoevalcap")


def test_input_errors():
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({1: "a cat", 99: "a dog"}, REFS, backend="fallback")
    with pytest.raises(ValueError, match="Unknown caption metric"):
        caption_metrics(PREDS, REFS, metrics=["BLEU"])
    with pytest.raises(ValueError, match="empty"):
        caption_metrics({}, REFS)
    with pytest.raises(ValueError, match="backend"):
        caption_metrics(PREDS, REFS, backend="java")


def test_only_predicted_images_are_scored():
    # Extra references are ignored (LAVIS evaluates the result's image ids), so CIDEr's document
    # frequency comes from the predicted images only.
    subset = {k: PREDS[k] for k in (1, 2, 3)}
    full = caption_metrics(subset, REFS, backend="fallback", metrics=["CIDEr"])
    only = caption_metrics(subset, {k: REFS[k] for k in subset}, backend="fallback", metrics=["CIDEr"])
    assert full.scores == only.scores


@needs_java
def test_fallback_equals_pycocoevalcap_on_clean_captions():
    coco = caption_metrics(PREDS, REFS, backend="pycocoevalcap", metrics=FAST)
    fallback = caption_metrics(PREDS, REFS, backend="fallback", metrics=FAST)
    assert coco.backend == BACKEND_COCO
    assert coco.unavailable == {}
    assert list(coco.scores) == FAST
    for name in FAST:
        assert fallback.scores[name] == pytest.approx(coco.scores[name], abs=1e-9), name


@needs_java
def test_fallback_is_close_on_rare_tokens():
    preds = {
        1: "Mr. Smith's dog @home, playing rock'n'roll?",
        2: "A 10-year-old boy holds a sign reading <stop>.",
        3: "Is it a cat?Yes, on a laptop (grey).",
        4: "two dogs' toys -- a ball...and a rope",
    }
    refs = {1: ["A dog at home with Mr. Smith.", "a dog listening to rock 'n' roll music", "The dog is playing at home."],
            2: ["A boy holding a stop sign.", "A young boy with a sign that says stop.", "a kid holds up a red sign"],
            3: ["A grey cat lying on a laptop.", "The cat is on the computer.", "a cat sitting on an open laptop"],
            4: ["Two dogs playing with a ball and a rope.", "Dogs with their toys.", "two dogs and toys: a ball, a rope"]}  # fmt: skip
    coco = caption_metrics(preds, refs, backend="pycocoevalcap", metrics=FAST)
    fallback = caption_metrics(preds, refs, backend="fallback", metrics=FAST)
    for name in FAST:
        assert abs(fallback.scores[name] - coco.scores[name]) < 0.1, name


@needs_java
@pytest.mark.slow
def test_pycocoevalcap_all_metrics():
    result = caption_metrics(PREDS, REFS)  # auto -> pycocoevalcap here, METEOR included (~10 s)
    assert result.backend == BACKEND_COCO
    assert list(result.scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert 0 < result.scores["METEOR"] < 1
    assert set(result.unavailable) == {"SPICE"}
