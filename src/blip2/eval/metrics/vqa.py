"""VQA accuracy as the official VQAv2 evaluation computes it, and GQA exact match (REFERENCE §7).

Follows the evaluation code LAVIS ships (`lavis/common/vqa_tools/vqa_eval.py`, itself the VQA
challenge's `vqaEval.py`), quirks included, so that numbers are comparable with published ones:

- the prediction is normalised fully: `\\n`/`\\t` -> space, strip, punctuation, then digits/articles;
- the ground-truth answers get punctuation processing only, and only when the answers of a question
  are not all identical (no lowercasing, no number words -> digits, no article removal);
- per question: mean over the leave-one-out subsets of `min(1, matches / 3)`;
- reported x100 and rounded to 2 decimals with Python's `round`, overall / per answer / question type.

The VQA challenge's own copy differs from LAVIS's in one place (it also applies the digit/article step
to the ground truth); we follow LAVIS, as REFERENCE §7 does.

Number of answers per question. The official data has 10. With n answers we take the same
leave-one-out mean over n subsets, but full credit needs `min(3, n - 1)` matching other annotators
instead of 3: identical to the official formula for every n >= 4, and a prediction that agrees with all
annotators always scores 1 (with the literal `/3`, two agreeing answers could give at most 1/3). A
single answer cannot be left out, so with n == 1 the score is exact match (1.0 or 0.0).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Facts copied from the official tables (word lists). Some entries look odd ("Im" with a capital,
# never reached after lowercasing; "somebody'd" -> "somebodyd"); they are kept because the official
# code has them and they decide which strings match.
# fmt: off
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Order matters only for readability; each symbol is handled independently.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# fmt: on
# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group was meant as a look-behind but is a
# look-ahead for the text "<=" + digit, which never matches at a ".". Net effect, reproduced here:
# every period not followed by a digit is removed ("3.5" keeps its period, "3." and "end." lose it).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_NUMBER_COMMA = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the `count`
# argument, so at most re.UNICODE == 32 periods are removed. Kept for exactness.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: delete or space out punctuation, strip periods.

    A symbol is deleted when it touches a space somewhere in the text ("yes !" -> "yes "), or when the
    text holds a comma between digits ("1,000" -> "1000": then every symbol is deleted); otherwise it
    becomes a space ("t-shirt" -> "t shirt"). Both tests look at the input, not the text being edited.
    """
    out = text
    has_number_comma = _NUMBER_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Normalise a predicted answer exactly as the official evaluation does."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _ground_truths(answers: Sequence[str]) -> list[str]:
    # Official quirk: punctuation only, and only if the annotators disagree (raw strings compared).
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def _score_normalized(pred: str, gts: Sequence[str]) -> float:
    n = len(gts)
    if n == 0:
        raise ValueError("vqa_score needs at least one ground-truth answer, got none.")
    if n == 1:
        return 1.0 if pred == gts[0] else 0.0  # nothing to leave out: exact match (module docstring)
    need = float(min(3, n - 1))  # == 3 for n >= 4, i.e. the official formula for 10 answers
    matches = [a == pred for a in gts]
    total = sum(matches)
    # Leave answer i out: the others hold `total - matches[i]` matches. Summed in order and divided
    # like the official code so the floats are bit-identical.
    accs = [min(1.0, float(total - m) / need) for m in matches]
    return float(sum(accs)) / len(accs)


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one raw predicted answer against the raw ground-truth answers.

    >>> vqa_score("Two", ["2"] * 2 + ["3"] * 8)  # 2 of 10 agree: 8 subsets hold 2 -> 2/3, 2 hold 1 -> 1/3
    0.6
    """
    return _score_normalized(normalize_answer(pred), _ground_truths(list(answers)))


@dataclass(frozen=True)
class VQAResult:
    """Scores x100 rounded to 2 decimals, as the official `accuracy` dict and `evalQA`."""

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[Any, float] = field(default_factory=dict)

    @property
    def num_questions(self) -> int:
        return len(self.per_question)


def _answer_text(a: Any) -> str:
    return a["answer"] if isinstance(a, Mapping) else str(a)


def _annotation_list(annotations: Any) -> list[Mapping[str, Any]]:
    # Accept the official annotation file ({"annotations": [...]}) or its list.
    if isinstance(annotations, Mapping) and "annotations" in annotations:
        annotations = annotations["annotations"]
    anns = list(annotations)
    if anns and not all(isinstance(a, Mapping) and "question_id" in a and "answers" in a for a in anns):
        raise ValueError(
            "VQA annotations must be dicts with 'question_id' and 'answers' (the official "
            "v2_mscoco_*_annotations.json format, or its 'annotations' list)."
        )
    return anns


def _prediction_dict(predictions: Mapping[Any, str] | Iterable[Mapping[str, Any]]) -> dict[Any, str]:
    # Accept {question_id: answer} or the official results list [{"question_id", "answer"}, ...].
    # Duplicated question ids (e.g. padding from a distributed sampler): the last one wins, as in the
    # official loader.
    if isinstance(predictions, Mapping):
        return {qid: str(a) for qid, a in predictions.items()}
    return {p["question_id"]: str(p["answer"]) for p in predictions}


def _check_same_questions(preds: Mapping[Any, str], qids: Sequence[Any]) -> None:
    missing = [q for q in qids if q not in preds]
    extra = set(preds) - set(qids)
    if missing or extra:
        raise ValueError(
            f"Predictions and annotations cover different questions: {len(missing)} question(s) without a "
            f"prediction (e.g. {missing[:3]}), {len(extra)} prediction(s) for unknown questions "
            f"(e.g. {sorted(map(str, extra))[:3]}). Evaluate on the annotations of the predicted questions."
        )


def _mean_x100(values: Sequence[float], n: int = 2) -> float:
    return round(100 * float(sum(values)) / len(values), n)


def vqa_accuracy(
    predictions: Mapping[Any, str] | Iterable[Mapping[str, Any]],
    annotations: Any,
) -> VQAResult:
    """Official VQAv2 accuracy over all annotated questions (every one needs a prediction).

    `annotations`: list of {"question_id", "answers": [{"answer": str}, ...] or [str, ...],
    optional "question_type", "answer_type"}, or the official file's dict holding that list.
    """
    anns = _annotation_list(annotations)
    if not anns:
        raise ValueError("No VQA annotations to evaluate.")
    preds = _prediction_dict(predictions)
    _check_same_questions(preds, [a["question_id"] for a in anns])

    per_q: dict[Any, float] = {}
    accs: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for ann in anns:
        gts = _ground_truths([_answer_text(a) for a in ann["answers"]])
        acc = _score_normalized(normalize_answer(preds[ann["question_id"]]), gts)
        accs.append(acc)
        per_q[ann["question_id"]] = round(100 * acc, 2)
        if ann.get("question_type") is not None:
            by_qtype.setdefault(ann["question_type"], []).append(acc)
        if ann.get("answer_type") is not None:
            by_atype.setdefault(ann["answer_type"], []).append(acc)
    return VQAResult(
        overall=_mean_x100(accs),
        per_answer_type={k: _mean_x100(v) for k, v in by_atype.items()},
        per_question_type={k: _mean_x100(v) for k, v in by_qtype.items()},
        per_question=per_q,
    )


def gqa_normalize(answer: str) -> str:
    """LAVIS GQA normalisation: punctuation then digits/articles (no whitespace step first)."""
    return process_digit_article(process_punctuation(answer))


def exact_match(pred: str, answer: str) -> bool:
    """GQA-style match: both sides normalised the same way (LAVIS GQATask, 2023-12 version)."""
    return gqa_normalize(pred) == gqa_normalize(answer)


def gqa_accuracy(predictions: Mapping[Any, str], answers: Mapping[Any, str]) -> float:
    """Exact-match accuracy x100 (not rounded, as LAVIS reports it) over the predicted questions."""
    if not predictions:
        raise ValueError("No GQA predictions to evaluate.")
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no ground-truth answer (e.g. {missing[:3]}).")
    hits = [1 if exact_match(p, answers[q]) else 0 for q, p in predictions.items()]
    return sum(hits) / len(hits) * 100
