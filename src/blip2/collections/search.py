"""Searching a photo index with a text or an image.

Text: the text's ITC feature against every stored query vector; an image scores its best query's cosine
(max over queries, REFERENCE §6), exactly as `Blip2.similarity` on an exact index. Then, like
`Blip2.retrieve`, the top `rerank_k` (128, LAVIS' k_test) are re-scored by ITM: score = ITM positive logit +
ITC cosine; the reported `itm` is the match probability (softmax), as `blip2 itm` shows. Their images are
read again from their files for that (a few dozen encodes; the index keeps no frozen features). Hits past
`rerank_k` follow in ITC order with score = ITC.

Image (query by example): similarity = the best cosine over all pairs (query vector of the query image,
query vector of the indexed image), the ITC rule taken both ways. Exact on an exact index (each query
vector's k*Q raw hits cover the top k images); an indexed copy of the query scores ~1. No ITM (it
scores image-text pairs).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from blip2.collections.index import PhotoIndex, embed_pixels, model_fingerprint
from blip2.inference.pipeline import RETRIEVAL_K


@dataclass
class Hit:
    rank: int
    path: str
    score: float  # the ranking score: ITM logit + ITC cosine where re-ranked, else the ITC cosine
    itc: float  # max-over-queries cosine (image queries: max over query pairs)
    itm: float | None = None  # ITM match probability, for re-ranked text hits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(index: PhotoIndex | str | os.PathLike) -> tuple[PhotoIndex, bool]:
    return (index, False) if isinstance(index, PhotoIndex) else (PhotoIndex.open(index), True)


@torch.no_grad()
def search(
    blip2,
    index: PhotoIndex | str | os.PathLike,
    text: str | None = None,
    image=None,
    k: int = 20,
    rerank: bool = True,
    rerank_k: int = RETRIEVAL_K,
    check_model: bool = True,
) -> list[Hit]:
    """The best `k` images of `index` for `text`, or for `image` (a path, PIL image or array). See the module
    docstring for the scores. `index` is an open PhotoIndex or its folder."""
    if (text is None) == (image is None):
        raise ValueError("search needs a text or an image (one of the two)")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    blip2._need_qformer_text()
    index, owned = _open(index)
    try:
        if check_model:
            index.check_model(model_fingerprint(blip2))
        if image is not None:
            pixels = blip2.images([image])  # (1, 3, S, S)
            queries = embed_pixels(blip2, pixels)[0]  # (Q, E)
            found = index.search_vectors(queries, k)
            paths = index.paths([i for i, _ in found])
            return [Hit(r, paths[i], s, s) for r, (i, s) in enumerate(found, 1)]
        query = blip2._text_itc([text]).float().cpu().numpy()  # (1, E)
        top = max(k, min(rerank_k, len(index))) if rerank else k
        found = index.search_vectors(query, top)
        paths = index.paths([i for i, _ in found])
        hits = [Hit(0, paths[i], s, s) for i, s in found]
        if rerank and hits:
            hits = _rerank(blip2, text, hits[: min(rerank_k, len(hits))]) + hits[min(rerank_k, len(hits)) :]
        hits = hits[:k]
        for r, hit in enumerate(hits, 1):
            hit.rank = r
        return hits
    finally:
        if owned:
            index.close()


def _rerank(blip2, text: str, hits: list[Hit]) -> list[Hit]:
    """ITM re-scoring (REFERENCE §6), as `Blip2.retrieve`: score = ITM positive logit + ITC cosine."""
    model = blip2.model
    readable, feats = [], []
    for hit in hits:
        try:
            feats.append(blip2.images([hit.path]))
            readable.append(hit)
        except (OSError, ValueError) as err:  # gone or damaged since it was indexed
            warnings.warn(f"{hit.path}: left out of the re-ranking ({err}); run `blip2 index` again", stacklevel=3)
    if not readable:
        return []
    pixels = torch.cat(feats)  # (n, 3, S, S)
    ids, mask = blip2._qformer_text([text])
    dtype = next(model.vision_model.parameters()).dtype
    logits = []
    for start in range(0, len(readable), blip2.batch_size):
        image = model.encode_image(pixels[start : start + blip2.batch_size].to(blip2.device, dtype))
        n = image.shape[0]
        logits.append(model.itm_logits(image, ids.expand(n, -1), mask.expand(n, -1)).float())
    logits = torch.cat(logits)  # (n, 2)
    probs = logits.softmax(-1)[:, 1].tolist()
    for hit, logit, p in zip(readable, logits[:, 1].tolist(), probs):
        hit.score, hit.itm = logit + hit.itc, p
    return sorted(readable, key=lambda h: -h.score)


# ------------------------------------------------------------------------------------------- for the server


def search_route_payload(blip2, index: PhotoIndex, body: dict[str, Any], load_image=None) -> dict[str, Any]:
    """The JSON answer of `POST /v1/search` for the request `body`:

        {"query": "a yellow circle"} or {"image": <what load_image accepts>},
        optional "k" (1..1000, default 20), "rerank" (bool, default true), "rerank_k" (1..1000, default 128)
    ->  {"object": "list", "index": {"images": N, "kind": "exact"}, "query": ..., "data": [
            {"rank": 1, "path": "...", "score": 1.23, "itc": 0.41, "itm": 0.97}, ...]}

    A bad request is a ValueError (the server answers 400 with its message). `load_image` turns the "image"
    field into a PIL image under the server's media policy; without it image queries are refused.
    """
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    text, image = body.get("query"), body.get("image")
    if (text is None) == (image is None):
        raise ValueError("give 'query' (a text) or 'image', one of the two")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError("'query' must be a non-empty string")

    def number(name: str, default: int) -> int:
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise ValueError(f"'{name}' must be an integer from 1 to 1000, got {value!r}")
        return value

    k, rerank_k = number("k", 20), number("rerank_k", RETRIEVAL_K)
    rerank = body.get("rerank", True)
    if not isinstance(rerank, bool):
        raise ValueError(f"'rerank' must be true or false, got {rerank!r}")
    if image is not None:
        if load_image is None:
            raise ValueError("this server does not take image queries")
        image = load_image(image)
    hits = search(blip2, index, text=text, image=image, k=k, rerank=rerank, rerank_k=rerank_k, check_model=False)
    return {
        "object": "list",
        "index": {"images": len(index), "kind": index.structure},
        "query": text if text is not None else "(image)",
        "data": [h.to_dict() for h in hits],
    }
