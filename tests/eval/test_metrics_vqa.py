"""VQA accuracy: every normalisation rule and the leave-one-out score, with hand-computed values."""

import pytest

from blip2.eval.metrics.vqa import (
    exact_match,
    gqa_accuracy,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # number words -> digits, "none" -> "0"; only zero..ten are mapped
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("one dog", "1 dog"),
        # articles a / an / the are dropped, other words kept
        ("the red car", "red car"),
        ("An apple", "apple"),
        ("a", ""),
        ("theater", "theater"),
        # contractions restored from the table
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats that", "what's that"),
        # table keys with capitals ("Im") never match after lowercasing: official quirk
        ("Im", "im"),
        # \n and \t -> space, strip, lowercase
        ("\tYes\n", "yes"),
        ("  Left  side ", "left side"),
        # punctuation touching no space becomes a space: "t-shirt" -> "t shirt"
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("black/white", "black white"),
        # punctuation next to a space is deleted: "red , white" -> "red  white" -> split
        ("red , white", "red white"),
        # a comma between digits: deleted (so the number survives)
        ("1,000", "1000"),
        # periods: removed unless followed by a digit
        ("3.5", "3.5"),
        ("Three.", "3"),
        ("end. 3.5", "end 3.5"),
        ("U.S.A.", "usa"),
        # apostrophes and colons are not in the punctuation list
        ("man's", "man's"),
        ("10:30", "10:30"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_context_rules():
    # "-" has no space beside it -> replaced by a space; "," has one -> deleted.
    assert process_punctuation("a-b, c") == "a b c"
    # A digit,digit anywhere makes every symbol deleted rather than spaced: "1,000-2,000" -> "10002000".
    assert process_punctuation("1,000-2,000") == "10002000"
    # The test looks at the original text: "x-y -z" holds " -", so both hyphens are deleted.
    assert process_punctuation("x-y -z") == "xy z"
    # The official sub() receives re.UNICODE (32) as its count: at most 32 periods go.
    assert process_punctuation("." * 40) == "." * 8
    # No lowercasing, no digits/articles: punctuation only.
    assert process_punctuation("The Two!") == "The Two "


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),
        # k of 10 annotators agree. Leaving out a matching answer leaves k-1 matches, another one k;
        # each subset scores min(1, matches/3), the question scores the mean of the 10 subsets.
        (1, 0.3),  # 1 x min(1, 0/3) + 9 x min(1, 1/3) = 3   -> /10 = 0.3
        (2, 0.6),  # 2 x 1/3 + 8 x 2/3 = 18/3 = 6            -> 0.6
        (3, 0.9),  # 3 x 2/3 + 7 x 1 = 9                     -> 0.9
        (4, 1.0),  # 4 x 1 + 6 x 1                           -> 1.0
        (10, 1.0),
    ],
)
def test_leave_one_out_partial_agreement(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_score("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_ground_truth_only_gets_punctuation_when_answers_differ():
    # Annotators disagree -> their answers get punctuation processing: "t-shirt" -> "t shirt", which
    # equals the normalised prediction. 3 matches: 3 x 2/3 + 7 x 1 = 9 -> 0.9.
    assert vqa_score("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # All 10 identical -> kept raw: "t-shirt" != "t shirt" -> 0 (official quirk).
    assert vqa_score("t-shirt", ["t-shirt"] * 10) == 0.0
    # Ground truth is never lowercased or digit-mapped; the prediction always is.
    assert vqa_score("Yes", ["yes"] * 10) == 1.0
    assert vqa_score("yes", ["Yes"] * 10) == 0.0
    assert vqa_score("two", ["2"] * 10) == 1.0
    assert vqa_score("2", ["two"] * 10) == 0.0
    # Number comma on both sides: GT "1,000" (disagreeing set) -> "1000"; pred "1,000" -> "1000".
    assert vqa_score("1,000", ["1,000"] + ["1000"] * 9) == 1.0


def test_answer_counts_other_than_ten():
    # n == 1: nothing to leave out, exact match after normalisation.
    assert vqa_score("The Cat.", ["cat"]) == 1.0
    assert vqa_score("dog", ["cat"]) == 0.0
    # n == 2 (full credit needs min(3, n-1) = 1 other match): leave out "cat" -> 0/1, leave out
    # "dog" -> 1/1 -> mean 0.5; both agree -> 1.0.
    assert vqa_score("cat", ["cat", "dog"]) == 0.5
    assert vqa_score("cat", ["cat", "cat"]) == 1.0
    # n == 3 (need 2): leave out a cat -> 1/2 (x2), leave out the dog -> 2/2 -> (0.5+0.5+1)/3 = 2/3.
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    # n == 5 (need 3, as official): leave out a cat -> 1/3 (x2), a dog -> 2/3 (x3) -> (8/3)/5 = 8/15.
    assert vqa_score("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx(8 / 15)
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("cat", [])


ANNOTATIONS = {
    "annotations": [
        # official format: answers as dicts
        {"question_id": 1, "question_type": "is the", "answer_type": "yes/no",
         "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 2, "question_type": "how many", "answer_type": "number",
         "answers": [{"answer": a} for a in ["2"] * 2 + ["3"] * 8]},
        {"question_id": 3, "question_type": "what color is the", "answer_type": "other",
         "answers": ["red"] * 10},  # plain strings are accepted too
        {"question_id": 4, "question_type": "how many", "answer_type": "number",
         "answers": ["1,000"] + ["1000"] * 9},
    ]
}  # fmt: skip


def test_vqa_accuracy_overall_and_per_type():
    preds = {1: "Yes", 2: "two", 3: "blue", 4: "1,000"}  # per question: 1.0, 0.6, 0.0, 1.0
    result = vqa_accuracy(preds, ANNOTATIONS)
    assert result.per_question == {1: 100.0, 2: 60.0, 3: 0.0, 4: 100.0}
    assert result.overall == 65.0  # (1 + 0.6 + 0 + 1) / 4
    assert result.per_answer_type == {"yes/no": 100.0, "number": 80.0, "other": 0.0}
    assert result.per_question_type == {"is the": 100.0, "how many": 80.0, "what color is the": 0.0}
    assert result.num_questions == 4
    # The official results list format gives the same result.
    as_list = [{"question_id": q, "answer": a} for q, a in preds.items()]
    assert vqa_accuracy(as_list, ANNOTATIONS["annotations"]) == result


def test_vqa_accuracy_rounds_to_two_decimals():
    anns = [{"question_id": q, "answers": ["cat"] * 10} for q in range(3)]
    assert vqa_accuracy({0: "cat", 1: "dog", 2: "dog"}, anns).overall == 33.33  # 100/3 rounded


def test_vqa_accuracy_needs_a_prediction_per_question():
    with pytest.raises(ValueError, match="without a prediction"):
        vqa_accuracy({1: "yes"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="unknown questions"):
        vqa_accuracy({1: "yes", 2: "2", 3: "red", 4: "1", 99: "x"}, ANNOTATIONS)


def test_gqa_exact_match_normalises_both_sides():
    assert exact_match("Two", "2")
    assert exact_match("the cat.", "Cat")  # ground truth lowercased too, unlike VQAv2
    assert exact_match("T-shirt", "t shirt")
    assert not exact_match("left", "right")
    # 2 of 3 correct -> 66.67 (not rounded)
    acc = gqa_accuracy({1: "Two", 2: "the cat.", 3: "left"}, {1: "2", 2: "Cat", 3: "right"})
    assert acc == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="no ground-truth"):
        gqa_accuracy({1: "x"}, {})
