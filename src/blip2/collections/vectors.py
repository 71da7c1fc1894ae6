"""The photo index's vectors: a faiss index holding every ITC query vector of every image (DESIGN §4).

Image `i` with `Q` queries stores its vectors under the ids `i*Q + q`, so a raw hit's image is `id // Q` and
removing an image is removing its `Q` ids. Vectors are normalised, so inner product = cosine, and an image's
first (best) raw hit is its max-over-queries ITC score (REFERENCE §6).

Structures:
- "exact": `IndexIDMap2(IndexFlatIP)`, a brute-force scan; exact max over queries.
- "ivf": `IndexIVFFlat` (inner product) holding our ids itself (it supports `remove_ids`; IDMap2 over IVF does
  not renumber correctly); approximate: only `nprobe` of its `nlist` lists are scanned.
- "hnsw": `IndexIDMap2(IndexHNSWFlat)`; approximate. HNSW cannot remove vectors: a removal rebuilds the
  graph from the stored vectors (slow on a large collection; "ivf" is the approximate kind `auto` picks).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

STRUCTURES = ("exact", "hnsw", "ivf")
KINDS = ("auto",) + STRUCTURES
EXACT_LIMIT = 100_000  # images: `auto` stays exact up to this many, then switches to IVF
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
IVF_MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
IVF_TRAIN_POINTS_PER_LIST = 39
IVF_MAX_LISTS = 4096  # training cost grows with lists x training points: bounded, a build stays minutes on a CPU
IVF_KMEANS_ITERATIONS = 10  # faiss' default is 25; 10 costs recall little and training 2.5x less


def structure_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    inner = faiss.downcast_index(index.index)
    return "hnsw" if isinstance(inner, faiss.IndexHNSWFlat) else "exact"


def wanted_structure(kind: str, n_images: int) -> str:
    """The structure a requested kind means for a collection of `n_images`."""
    if kind == "auto":
        return "exact" if n_images <= EXACT_LIMIT else "ivf"
    return kind


def ivf_lists(n_vectors: int) -> int:
    """nlist: ~4 sqrt(N) (faiss' rule of thumb), at most 4096, with at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n_vectors)), IVF_MAX_LISTS, n_vectors // IVF_MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, max(8, nlist // 16)))


def new_index(structure: str, dim: int, train: np.ndarray | None = None) -> faiss.Index:
    """An empty index; "ivf" is trained on `train` (n, dim) (a sample of the vectors it will hold)."""
    if structure == "exact":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if structure == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.hnsw.efSearch = HNSW_EF_SEARCH
        return faiss.IndexIDMap2(graph)
    if structure == "ivf":
        if train is None or len(train) == 0:
            raise ValueError("an IVF index needs vectors to train on")
        nlist = ivf_lists(len(train))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVF_KMEANS_ITERATIONS
        rng = np.random.default_rng(0)
        n_train = min(len(train), nlist * IVF_TRAIN_POINTS_PER_LIST)
        sample = train if n_train == len(train) else train[np.sort(rng.choice(len(train), n_train, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = default_nprobe(nlist)
        quantizer.this.disown()  # the IVF index owns its quantizer from here on
        index.own_fields = True
        return index
    raise ValueError(f"unknown index kind {structure!r} (known: {', '.join(KINDS)})")


def all_ids(index: faiss.Index) -> np.ndarray:
    """Every vector id in the index (int64, any order)."""
    if index.ntotal == 0:
        return np.zeros(0, np.int64)
    if isinstance(index, faiss.IndexIVFFlat):
        lists = index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(index.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64)
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def all_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), vectors (n, dim)) of everything stored: what converting or rebuilding an index needs."""
    if index.ntotal == 0:
        return np.zeros(0, np.int64), np.zeros((0, index.d), np.float32)
    if isinstance(index, faiss.IndexIVFFlat):
        lists, ids, vecs = index.invlists, [], []
        for i in range(index.nlist):
            n = lists.list_size(i)
            if n:
                ids.append(faiss.rev_swig_ptr(lists.get_ids(i), n).copy())
                codes = faiss.rev_swig_ptr(lists.get_codes(i), n * index.code_size).copy()
                vecs.append(codes.view(np.float32).reshape(n, index.d))
        return np.concatenate(ids).astype(np.int64), np.concatenate(vecs)
    return faiss.vector_to_array(index.id_map).astype(np.int64), index.index.reconstruct_n(0, index.ntotal)


def convert(index: faiss.Index, structure: str) -> faiss.Index:
    """The same vectors under the same ids in another structure."""
    ids, vecs = all_vectors(index)
    out = new_index(structure, index.d, train=vecs)
    if len(ids):
        out.add_with_ids(vecs, ids)
    return out


def add(index: faiss.Index, image_ids: np.ndarray, vectors: np.ndarray) -> None:
    """vectors (B, Q, E) of the images `image_ids` (B,)."""
    b, q, _ = vectors.shape
    ids = (np.asarray(image_ids, np.int64)[:, None] * q + np.arange(q)[None, :]).reshape(-1)  # (B*Q,)
    index.add_with_ids(np.ascontiguousarray(vectors.reshape(b * q, -1), dtype=np.float32), ids)


def remove(index: faiss.Index, image_ids, num_queries: int) -> faiss.Index:
    """Index without the images `image_ids`; returns the index to use from now on (HNSW is rebuilt)."""
    image_ids = np.asarray(list(image_ids), np.int64)
    if len(image_ids) == 0 or index.ntotal == 0:
        return index
    ids = (image_ids[:, None] * num_queries + np.arange(num_queries)[None, :]).reshape(-1)
    if structure_of(index) != "hnsw":
        index.remove_ids(ids)
        return index
    stored, vecs = all_vectors(index)
    keep = ~np.isin(stored, ids)
    out = new_index("hnsw", index.d)
    if keep.any():
        out.add_with_ids(vecs[keep], stored[keep])
    return out


def search(index: faiss.Index, queries: np.ndarray, k: int, num_queries: int) -> list[tuple[int, float]]:
    """The best `k` images for `queries` (m, E): [(image_id, score)], best first, where an image's score is
    the max over its stored vectors and over the m query vectors.

    k*Q raw hits always hold at least k distinct images (an image owns at most Q vectors), and on the exact
    structure the first hit of each image is its maximum, so the result is exact there. Approximate structures
    may return fewer raw hits than asked (IVF's probed lists run dry): the search widens (more hits, more
    lists probed, a larger HNSW beam) until k images come back or everything was searched.
    """
    if index.ntotal == 0 or k <= 0:
        return []
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k_raw = min(index.ntotal, k * num_queries)
    structure = structure_of(index)
    nprobe = index.nprobe if structure == "ivf" else 0
    while True:
        if structure == "ivf":
            scores, ids = index.search(queries, k_raw, params=faiss.SearchParametersIVF(nprobe=nprobe))
        elif structure == "hnsw":
            ef = max(HNSW_EF_SEARCH, k_raw)
            scores, ids = index.search(queries, k_raw, params=faiss.SearchParametersHNSW(efSearch=ef))
        else:
            scores, ids = index.search(queries, k_raw)
        best: dict[int, float] = {}
        for row_scores, row_ids in zip(scores, ids):
            for s, i in zip(row_scores.tolist(), row_ids.tolist()):
                if i < 0:
                    break  # -1: fewer raw hits than asked
                image = i // num_queries
                if s > best.get(image, -math.inf):
                    best[image] = s
        done = structure == "exact" or k_raw >= index.ntotal and (structure != "ivf" or nprobe >= index.nlist)
        if len(best) >= k or done:
            break
        k_raw = min(index.ntotal, 2 * k_raw)
        if structure == "ivf":
            nprobe = min(index.nlist, 2 * nprobe)
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:k]


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write to a temp file, fsync, then rename over `path`: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
