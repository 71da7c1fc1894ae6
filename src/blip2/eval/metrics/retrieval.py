"""Image-text retrieval recall: TR@K and IR@K as LAVIS reports them (REFERENCE §7).

TR@K (text retrieval, image -> texts): share of images whose best-ranked ground-truth caption (the
minimum rank over its ~5 captions) has rank < K. IR@K (image retrieval, text -> images): share of
texts whose ground-truth image has rank < K. Ranks start at 0; results are x100.

Ranking follows LAVIS (`np.argsort(scores)[::-1]`, descending), so ties are broken the way its
numpy sort breaks them; with real-valued model scores ties are rare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

KS = (1, 5, 10)
_CHUNK = 256  # rows ranked at once: bounds memory (256 x 25k int64 = 50 MB) yet keeps numpy busy


def _to_numpy(scores: Any) -> np.ndarray:
    # Accept numpy, nested lists or a torch tensor (any device/dtype) without importing torch.
    if hasattr(scores, "detach"):
        t = scores.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        scores = t.numpy()
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"Expected a 2-D score matrix, got shape {arr.shape}.")
    return arr


def _rank_positions(scores: np.ndarray) -> np.ndarray:
    """positions[r, c] = rank of column c in row r when sorted by descending score (0 = best)."""
    positions = np.empty(scores.shape, dtype=np.int64)
    cols = np.arange(scores.shape[1])
    for start in range(0, scores.shape[0], _CHUNK):
        order = np.argsort(scores[start : start + _CHUNK], axis=1)[:, ::-1]  # (chunk, n_cols), best first
        rows = np.arange(order.shape[0])[:, None]
        positions[start + rows, order] = cols  # invert the permutation
    return positions


def i2t_ranks(scores_i2t: Any, img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]]) -> np.ndarray:
    """Per image, rank of its best-ranked ground-truth caption. scores_i2t: (n_images, n_texts)."""
    scores = _to_numpy(scores_i2t)
    if len(img2txt) != scores.shape[0]:
        raise ValueError(
            f"img2txt lists {len(img2txt)} images but the score matrix has {scores.shape[0]} rows."
        )
    pos = _rank_positions(scores)
    return np.array([pos[i, list(img2txt[i])].min() for i in range(scores.shape[0])], dtype=np.int64)


def t2i_ranks(scores_t2i: Any, txt2img: Sequence[int] | Mapping[int, int]) -> np.ndarray:
    """Per text, rank of its ground-truth image. scores_t2i: (n_texts, n_images)."""
    scores = _to_numpy(scores_t2i)
    if len(txt2img) != scores.shape[0]:
        raise ValueError(
            f"txt2img lists {len(txt2img)} texts but the score matrix has {scores.shape[0]} rows."
        )
    pos = _rank_positions(scores)
    gt = np.array([txt2img[t] for t in range(scores.shape[0])], dtype=np.int64)
    return pos[np.arange(scores.shape[0]), gt]


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share (x100) of queries whose ground truth ranks within the top k."""
    return 100.0 * float(np.count_nonzero(ranks < k)) / len(ranks)


@dataclass(frozen=True)
class RetrievalResult:
    """Field names are LAVIS's result keys: txt_* = TR (image -> text), img_* = IR (text -> image)."""

    txt_r1: float
    txt_r5: float
    txt_r10: float
    txt_r_mean: float
    img_r1: float
    img_r5: float
    img_r10: float
    img_r_mean: float
    r_mean: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def retrieval_metrics(
    scores_i2t: Any,
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    txt2img: Sequence[int] | Mapping[int, int],
    scores_t2i: Any | None = None,
) -> RetrievalResult:
    """TR@1/5/10, IR@1/5/10 and their means from image-text scores.

    scores_i2t: (n_images, n_texts). scores_t2i: (n_texts, n_images), defaults to scores_i2t.T; pass
    it when the two directions were scored separately (BLIP-2 re-ranks each direction's top-k by ITM).
    """
    s_i2t = _to_numpy(scores_i2t)
    s_t2i = s_i2t.T if scores_t2i is None else _to_numpy(scores_t2i)
    if s_t2i.shape != s_i2t.shape[::-1]:
        raise ValueError(
            f"scores_t2i has shape {s_t2i.shape}; expected {s_i2t.shape[::-1]} (texts x images)."
        )
    tr_ranks, ir_ranks = i2t_ranks(s_i2t, img2txt), t2i_ranks(s_t2i, txt2img)
    tr1, tr5, tr10 = (recall_at_k(tr_ranks, k) for k in KS)
    ir1, ir5, ir10 = (recall_at_k(ir_ranks, k) for k in KS)
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3  # LAVIS's means
    return RetrievalResult(
        txt_r1=tr1, txt_r5=tr5, txt_r10=tr10, txt_r_mean=tr_mean,
        img_r1=ir1, img_r5=ir5, img_r10=ir10, img_r_mean=ir_mean,
        r_mean=(tr_mean + ir_mean) / 2,
    )  # fmt: skip
