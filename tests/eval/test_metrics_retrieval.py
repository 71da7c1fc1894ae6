"""Retrieval recall on hand-made score matrices with known ranks."""

import numpy as np
import pytest

from blip2.eval.metrics.retrieval import i2t_ranks, recall_at_k, retrieval_metrics, t2i_ranks


def _scores_from_orders(orders: list[list[int]]) -> np.ndarray:
    """Row r ranks its columns in the order orders[r] (best first): scores n, n-1, ..., 1."""
    n = len(orders[0])
    scores = np.zeros((len(orders), n))
    for r, order in enumerate(orders):
        scores[r, order] = np.arange(n, 0, -1)
    return scores


# 4 images, 8 texts, two captions per image.
IMG2TXT = [[0, 1], [2, 3], [4, 5], [6, 7]]
TXT2IMG = [0, 0, 1, 1, 2, 2, 3, 3]
S_I2T = _scores_from_orders(
    [
        [0, 5, 1, 2, 3, 4, 6, 7],  # image 0: caption 0 first -> rank 0
        [0, 1, 2, 4, 5, 6, 7, 3],  # image 1: caption 2 at 2, caption 3 at 7 -> best 2
        [0, 1, 2, 3, 6, 7, 4, 5],  # image 2: captions 4, 5 at 6, 7 -> 6
        [0, 1, 2, 3, 4, 7, 5, 6],  # image 3: caption 7 at 5, caption 6 at 7 -> 5
    ]
)
# Text -> image ranks of the ground-truth image, chosen: 0, 0, 1, 3, 0, 2, 1, 0.
S_T2I = _scores_from_orders(
    [
        [0, 1, 2, 3],
        [0, 3, 2, 1],
        [0, 1, 2, 3],  # gt 1 at 1
        [0, 2, 3, 1],  # gt 1 at 3
        [2, 0, 1, 3],
        [0, 1, 2, 3],  # gt 2 at 2
        [0, 3, 1, 2],  # gt 3 at 1
        [3, 2, 1, 0],
    ]
)


def test_ranks():
    assert i2t_ranks(S_I2T, IMG2TXT).tolist() == [0, 2, 6, 5]
    assert t2i_ranks(S_T2I, TXT2IMG).tolist() == [0, 0, 1, 3, 0, 2, 1, 0]


def test_recall_at_k_boundaries():
    ranks = np.array([0, 4, 5, 9, 10])  # rank r counts for K > r: rank 4 is in R@5, rank 5 is not
    assert recall_at_k(ranks, 1) == 20.0
    assert recall_at_k(ranks, 5) == 40.0
    assert recall_at_k(ranks, 10) == 80.0


def test_retrieval_metrics():
    r = retrieval_metrics(S_I2T, IMG2TXT, TXT2IMG, scores_t2i=S_T2I)
    # TR ranks [0, 2, 6, 5]: @1 1/4, @5 2/4, @10 4/4.
    assert (r.txt_r1, r.txt_r5, r.txt_r10) == (25.0, 50.0, 100.0)
    # IR ranks [0, 0, 1, 3, 0, 2, 1, 0]: @1 4/8; only 4 images so @5 = @10 = 100.
    assert (r.img_r1, r.img_r5, r.img_r10) == (50.0, 100.0, 100.0)
    assert r.txt_r_mean == pytest.approx(175 / 3)
    assert r.img_r_mean == pytest.approx(250 / 3)
    assert r.r_mean == pytest.approx((175 / 3 + 250 / 3) / 2)
    assert set(r.as_dict()) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean",
                                "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}  # fmt: skip


def test_single_matrix_torch_and_mappings():
    torch = pytest.importorskip("torch")
    scores = np.array([[0.9, 0.1, 0.8, 0.2], [0.3, 0.7, 0.4, 0.6]])  # 2 images x 4 texts
    img2txt, txt2img = [[0, 2], [1, 3]], [0, 1, 0, 1]
    # Texts -> images use the transpose: each text's column max is at its own image -> IR@1 = 100.
    r = retrieval_metrics(scores, img2txt, txt2img)
    assert (r.txt_r1, r.img_r1) == (100.0, 100.0)
    # LAVIS passes dicts keyed by index; torch tensors (here bfloat16) are accepted as well.
    r_t = retrieval_metrics(
        torch.tensor(scores).bfloat16(), dict(enumerate(img2txt)), dict(enumerate(txt2img))
    )
    assert r_t == r
    # Text 1 now scores image 0 highest (0.95 > 0.7): IR@1 drops to 3/4.
    scores[0, 1] = 0.95
    assert retrieval_metrics(scores, img2txt, txt2img).img_r1 == 75.0


def test_matches_plain_argsort_loop_on_random_scores():
    # More rows than one ranking chunk (256) to cover the chunked inverse permutation.
    rng = np.random.default_rng(0)
    n_img, per = 300, 3
    scores = rng.standard_normal((n_img, n_img * per))
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    expected_tr = [
        min(np.where(np.argsort(row)[::-1] == t)[0][0] for t in img2txt[i]) for i, row in enumerate(scores)
    ]
    expected_ir = [np.where(np.argsort(col)[::-1] == txt2img[t])[0][0] for t, col in enumerate(scores.T)]
    assert i2t_ranks(scores, img2txt).tolist() == expected_tr
    assert t2i_ranks(scores.T, txt2img).tolist() == expected_ir


def test_shape_errors():
    with pytest.raises(ValueError, match="img2txt lists 3 images"):
        retrieval_metrics(S_I2T, IMG2TXT[:3], TXT2IMG)
    with pytest.raises(ValueError, match="expected"):
        retrieval_metrics(S_I2T, IMG2TXT, TXT2IMG, scores_t2i=S_I2T)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3), IMG2TXT, TXT2IMG)
