"""easy-VQA (the `easy_vqa` package) as evaluation data: questions, per-image colour/shape labels, captions.

Each easy-VQA image holds one flat shape in one of 8 colours and 3 shapes on a pale background; answers are
yes/no, a colour or a shape. The package ships questions, not labels, so an image's (colour, shape) comes
from its questions:
- an open question's answer that is a colour or a shape ("what color is the shape?" -> "red"), and the
  colour or shape the question itself names ("what is the color of the triangle?" presupposes a triangle);
- yes/no questions: "is there a red shape?" -> yes means red, no rules red out; "not"/"no" in the question
  flips it ("is there not a red shape?" -> no means red); the one candidate left after ruling out is taken.
That decides the colour of 922 and the shape of 954 of the 1,000 test images (888 both). For the rest the
pixels decide, constrained by what the questions ruled out: the colour is the palette colour (the package
draws exact RGB values) with the most pixels, the shape follows the fill ratio of the shape's pixels in
their bounding box (triangle 0.51-0.69, circle 0.73-0.90, rectangle 0.909-1.0). Checked against every
question-derived label of both splits (4,634 colours, 4,791 shapes): all agree. The pixel rule is still
only the fallback: the questions are the package's ground truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# The 8 colours, 3 shapes and the RGB values the package draws its shapes with (measured: every
# question-derived colour matches one) live with our own renderer, which draws the same colours.
from blip2.data.shapes import COLOURS, PALETTE, SHAPES

YES_NO = ("yes", "no")
SPLITS = ("train", "test")
# Fill ratio (shape pixels / bounding box) of each shape, measured over both splits; a ratio between two
# ranges goes to the nearer one.
FILL_RANGES = {"triangle": (0.45, 0.70), "circle": (0.72, 0.905), "rectangle": (0.905, 1.0)}
_WORD = re.compile(r"[a-z]+")


def question_type(answer: str) -> str:
    """easy-VQA question type from the reference answer: "yes/no", "colour" or "shape"."""
    if answer in YES_NO:
        return "yes/no"
    if answer in COLOURS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"{answer!r} is not an easy-VQA answer (yes/no, {', '.join(COLOURS + SHAPES)}).")


def answer_type(answer: str) -> str:
    """VQAv2-style answer type: "yes/no" or "other"."""
    return "yes/no" if answer in YES_NO else "other"


def caption_text(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def all_caption_texts() -> list[str]:
    """The 24 colour-shape texts, colour-major: "a black circle", "a black rectangle", ..."""
    return [caption_text(c, s) for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class Question:
    question_id: int  # position in the package's question list
    image_id: int
    image: str  # absolute path
    question: str
    answer: str


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"easy-VQA has no split {split!r}; use one of {', '.join(SPLITS)}.")


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise ValueError("the easy-VQA data needs the easy-vqa package: pip install easy-vqa") from None
    return easy_vqa


@lru_cache(maxsize=2)
def questions(split: str) -> tuple[Question, ...]:
    """Every question of a split, in the package's order (grouped by image)."""
    _check_split(split)
    pkg = _package()
    texts, answers, image_ids = getattr(pkg, f"get_{split}_questions")()
    paths = getattr(pkg, f"get_{split}_image_paths")()
    return tuple(
        Question(i, int(img), str(paths[img]), str(q), str(a))
        for i, (q, a, img) in enumerate(zip(texts, answers, image_ids))
    )


def _facts_from_questions(qs: tuple[Question, ...]) -> tuple[dict[int, set[str]], dict[int, set[str]]]:
    """Per image: words known to hold (colour/shape) and words ruled out."""
    known: dict[int, set[str]] = {}
    ruled_out: dict[int, set[str]] = {}
    vocab = set(COLOURS) | set(SHAPES)
    for q in qs:
        words = _WORD.findall(q.question.lower())
        named = {w for w in words if w in vocab}
        if q.answer in YES_NO:
            holds = (q.answer == "yes") != ("not" in words or "no" in words)
            (known if holds else ruled_out).setdefault(q.image_id, set()).update(named)
        else:  # an open question: its answer holds and so does what it presupposes
            known.setdefault(q.image_id, set()).update(named | {q.answer})
    return known, ruled_out


def _pixel_labels(path: str) -> tuple[str, float]:
    """(palette colour with the most pixels, fill ratio of the non-background pixels' bounding box)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB")).astype(np.int64)  # (H, W, 3)
    flat = arr.reshape(-1, 3)
    counts = {c: int((flat == np.asarray(rgb)).all(-1).sum()) for c, rgb in PALETTE.items()}
    colour = max(counts, key=lambda c: counts[c])
    values, freq = np.unique(flat, axis=0, return_counts=True)
    background = values[freq.argmax()]  # the pale background is most of the image
    mask = np.abs(arr - background).sum(-1) > 60  # shape pixels, anti-aliased edges included
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return colour, 1.0
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return colour, float(mask.sum()) / float(box)


def _distance(x: float, lo_hi: tuple[float, float]) -> float:
    return max(lo_hi[0] - x, x - lo_hi[1], 0.0)


def _pick(candidates: tuple[str, ...], known: set[str], ruled_out: set[str]) -> str | None:
    hits = [c for c in candidates if c in known]
    if len(hits) == 1:
        return hits[0]
    left = [c for c in candidates if c not in ruled_out]
    return left[0] if len(left) == 1 else None


@lru_cache(maxsize=2)
def image_labels(split: str) -> dict[int, tuple[str, str]]:
    """{image_id: (colour, shape)} for every image of a split (module docstring: questions, then pixels)."""
    qs = questions(split)
    known, ruled_out = _facts_from_questions(qs)
    paths = {q.image_id: q.image for q in qs}
    labels: dict[int, tuple[str, str]] = {}
    for image_id, path in sorted(paths.items()):
        k, r = known.get(image_id, set()), ruled_out.get(image_id, set())
        colour, shape = _pick(COLOURS, k, r), _pick(SHAPES, k, r)
        if colour is None or shape is None:
            pixel_colour, fill = _pixel_labels(path)
            if colour is None:
                colour = pixel_colour
            if shape is None:
                allowed = [s for s in SHAPES if s not in r] or list(SHAPES)
                shape = min(allowed, key=lambda s: _distance(fill, FILL_RANGES[s]))
        labels[image_id] = (colour, shape)
    return labels


def mentioned(caption: str) -> tuple[set[str], set[str]]:
    """The colour words and shape words a caption uses ("grey" counts as gray; plurals do not count)."""
    words = {"gray" if w == "grey" else w for w in _WORD.findall(caption.lower())}
    return words & set(COLOURS), words & set(SHAPES)


def colour_shape_scores(caption: str, colour: str, shape: str) -> dict[str, bool]:
    """Whether a caption names the right colour / shape / both, and no other colour or shape word.

    "colour" is right when the only colour word in the caption is the image's colour; "shape" likewise;
    "colour_shape" needs both. "a red circle" for a red circle: all three; "a red and blue circle": shape
    only; "a red shape": colour only.
    """
    colours, shapes = mentioned(caption)
    right_colour, right_shape = colours == {colour}, shapes == {shape}
    return {"colour": right_colour, "shape": right_shape, "colour_shape": right_colour and right_shape}
