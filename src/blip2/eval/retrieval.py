"""Image-text retrieval evaluation as LAVIS' `compute_sim_matrix` (REFERENCE §6-7).

1. Every image is encoded once (frozen features kept for ITM) and every text once: the full ITC matrix,
   cosine of the best query, (n_images, n_texts).
2. Each image's top-k texts and each text's top-k images (k_test = 128) are re-scored with
   ITM positive logit + ITC cosine; every other pair gets -100. A pair in both top-k sets is run once.
3. Recall from both matrices: "itc" (step 1 only) and "itm_rerank" (step 2). TR@K: share of images whose
   best-ranked own text is in the top K; IR@K: share of texts whose (best-ranked) image is in the top K.
   With one image per text this is exactly `blip2.eval.metrics.retrieval_metrics`; when a text describes
   many images (easy-VQA: 24 colour-shape texts for 1,000 images) IR@K counts a text as found when any of
   its images is in the top K, and precision@K (share of the top K images that match the text, K capped
   at the number of images) is reported per text and on average, since recall alone saturates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blip2.eval.datasets import RetrievalSet
from blip2.eval.metrics.retrieval import KS, i2t_ranks, recall_at_k
from blip2.eval.report import (
    METRICS, PREDICTIONS, REPORT, SAMPLES, EvalResult, Report, Sample, chunks, md_table, progress_bar,
    retrieval_grid, write_json, write_jsonl, write_report,
)  # fmt: skip

K_TEST = 128  # REFERENCE §6
TOP_SAVED = 10  # hits saved per query in the predictions file
N_QUERIES_SHOWN = 4
N_HITS_SHOWN = 5


@dataclass
class Scores:
    itc: Any  # (n_images, n_texts) torch float32, CPU
    i2t: Any  # (n_images, n_texts): ITM + ITC on each image's top-k texts, -100 elsewhere
    t2i: Any  # (n_texts, n_images): same for each text's top-k images
    itm_pairs: int  # ITM forward passes run


def score_matrices(model, data: RetrievalSet, k_test: int = K_TEST, progress: bool | None = None) -> Scores:
    """The ITC matrix and both re-ranked matrices (module docstring), images and texts encoded once."""
    import torch

    from blip2.data.text import tokenize_qformer
    from blip2.models.losses import max_over_queries

    model._need_qformer_text()
    net, bs = model.model, model.batch_size
    with torch.no_grad():
        feats, image_itc = [], []
        with progress_bar(len(data.images), "encoding images", "img", progress) as bar:
            for chunk in chunks(data.images, bs):
                f = net.encode_image(model._pixels(chunk))  # (B, N, Dv)
                feats.append(f)
                image_itc.append(net.image_itc_features(net.query(f).hidden))  # (B, Q, E)
                bar.update(len(chunk))
        feats, image_itc = torch.cat(feats), torch.cat(image_itc)
        tokens = tokenize_qformer(model.qformer_tokenizer, list(data.texts))
        ids, mask = tokens.input_ids.to(model.device), tokens.attention_mask.to(model.device)  # (Nt, T)
        text_itc = torch.cat([net.text_itc_features(net.encode_text(i, m))
                              for i, m in zip(ids.split(bs * 8), mask.split(bs * 8))])  # (Nt, E)
        n_i, n_t = len(data.images), len(data.texts)
        # (Ni, Nt) in image blocks: max_over_queries makes an (block, Nt, Q) tensor on the way.
        block = max(1, 2**24 // max(1, n_t * image_itc.shape[1]))
        itc = torch.cat([max_over_queries(b, text_itc).float() for b in image_itc.split(block)])

        k_i2t, k_t2i = min(k_test, n_t), min(k_test, n_i)
        top_i2t = itc.topk(k_i2t, dim=1).indices  # (Ni, k)
        top_t2i = itc.t().topk(k_t2i, dim=1).indices  # (Nt, k)
        every_image = torch.arange(n_i, device=itc.device).repeat_interleave(k_i2t)  # (Ni * k,)
        every_text = torch.arange(n_t, device=itc.device).repeat_interleave(k_t2i)  # (Nt * k,)
        image_of = torch.cat([every_image, top_t2i.flatten()])  # pairs: image->text ones, then text->image
        text_of = torch.cat([top_i2t.flatten(), every_text])
        pairs, inverse = torch.unique(image_of * n_t + text_of, return_inverse=True)  # each pair once
        itm = torch.empty(len(pairs), device=itc.device)
        done = 0
        with progress_bar(len(pairs), "ITM re-ranking", "pair", progress) as bar:
            for chunk in pairs.split(bs * 4):
                i, t = chunk // n_t, chunk % n_t
                length = int(mask[t].sum(1).max())  # drop padding columns no text of the chunk needs
                logits = net.itm_logits(feats[i], ids[t, :length], mask[t, :length])  # (B, 2)
                itm[done : done + len(chunk)] = logits[:, 1].float()  # positive-class logit (REFERENCE §6)
                done += len(chunk)
                bar.update(len(chunk))
        itm_i2t = itm[inverse[: n_i * k_i2t]].view(n_i, k_i2t)
        itm_t2i = itm[inverse[n_i * k_i2t :]].view(n_t, k_t2i)
        i2t = torch.full((n_i, n_t), -100.0, device=itc.device)
        i2t.scatter_(1, top_i2t, itm_i2t + itc.gather(1, top_i2t))
        t2i = torch.full((n_t, n_i), -100.0, device=itc.device)
        t2i.scatter_(1, top_t2i, itm_t2i + itc.t().gather(1, top_t2i))
    return Scores(itc.cpu(), i2t.cpu(), t2i.cpu(), len(pairs))


def ranks(scores_i2t: Any, scores_t2i: Any, data: RetrievalSet) -> tuple[np.ndarray, np.ndarray]:
    """Per image the rank of its best-ranked text; per text the rank of its best-ranked image (-1: the text
    has no image in the set)."""
    tr = i2t_ranks(scores_i2t, data.img2txt)
    queries = [t for t, imgs in enumerate(data.txt2img) if imgs]
    ir = np.full(len(data.texts), -1, dtype=np.int64)
    ir[queries] = i2t_ranks(np.asarray(scores_t2i)[queries], [data.txt2img[t] for t in queries])
    return tr, ir


def recalls(tr: np.ndarray, ir: np.ndarray) -> dict[str, float]:
    """LAVIS' keys: txt_r* = TR (image -> text), img_r* = IR (text -> image), x100."""
    ir = ir[ir >= 0]
    out = {f"txt_r{k}": recall_at_k(tr, k) for k in KS}
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in KS) / len(KS)
    out.update({f"img_r{k}": recall_at_k(ir, k) for k in KS})
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in KS) / len(KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def precision_at_k(scores_t2i: Any, data: RetrievalSet, ks=KS) -> dict[int, list[float | None]]:
    """{K: per text, the share (x100) of its top K images that it describes (None: no image in the set)}."""
    s = np.asarray(scores_t2i)
    order = np.argsort(-s, axis=1, kind="stable")
    out: dict[int, list[float | None]] = {}
    for k in ks:
        kk = min(k, s.shape[1])
        out[k] = [100.0 * len(set(order[t, :kk].tolist()) & set(imgs)) / kk if imgs else None
                  for t, imgs in enumerate(data.txt2img)]
    return out


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept)


def _top(row: np.ndarray, n: int) -> list[int]:
    return np.argsort(-row, kind="stable")[:n].tolist()


def evaluate_retrieval(model, data: RetrievalSet, out_dir: Path, *, model_name: str = "", data_name: str = "",
                       k_test: int = K_TEST, progress: bool | None = None) -> EvalResult:
    """Score, rank, and write predictions / metrics / report / grid of top results into `out_dir`."""
    if not data.images or not data.texts:
        raise ValueError("retrieval needs at least one image and one text.")
    start = time.perf_counter()
    s = score_matrices(model, data, k_test, progress)
    itc, i2t, t2i = s.itc.numpy(), s.i2t.numpy(), s.t2i.numpy()
    tr_itc, ir_itc = ranks(itc, itc.T, data)
    tr, ir = ranks(i2t, t2i, data)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "task": "retrieval", "model": model_name, "data": data_name, "n_images": len(data.images),
        "n_texts": len(data.texts), "n_text_queries": int((ir >= 0).sum()), "k_test": k_test,
        "itm_pairs": s.itm_pairs, "itc": recalls(tr_itc, ir_itc), "itm_rerank": recalls(tr, ir),
        "multi_image_texts": data.multi_image_texts,
    }
    precision: dict[str, dict[int, list]] = {}
    if data.multi_image_texts:
        precision = {"itc": precision_at_k(itc.T, data), "itm_rerank": precision_at_k(t2i, data)}
        for name, per_k in precision.items():
            metrics[name].update({f"precision_at_{k}": _mean(v) for k, v in per_k.items()})
        metrics["precision_at_10_per_text"] = {
            text: {"itc": precision["itc"][10][t], "itm_rerank": precision["itm_rerank"][10][t],
                   "n_images": len(data.txt2img[t])}
            for t, text in enumerate(data.texts)
        }
    metrics["seconds"] = round(seconds, 2)

    rows = []
    for t, text in enumerate(data.texts):
        hits = _top(t2i[t], TOP_SAVED)
        rows.append({
            "direction": "text->image", "text_index": t, "text": text,
            "images": [data.images[i] for i in data.txt2img[t]] if not data.multi_image_texts else None,
            "n_images": len(data.txt2img[t]), "rank": int(ir[t]), "itc_rank": int(ir_itc[t]),
            "top": [{"image": data.images[i], "image_id": data.image_ids[i], "score": float(t2i[t, i]),
                     "itc": float(itc[i, t]), "match": i in data.txt2img[t]} for i in hits],
        })  # fmt: skip
    for i, image in enumerate(data.images):
        hits = _top(i2t[i], TOP_SAVED)
        rows.append({
            "direction": "image->text", "image_index": i, "image": image, "image_id": data.image_ids[i],
            "texts": [data.texts[t] for t in data.img2txt[i]], "rank": int(tr[i]), "itc_rank": int(tr_itc[i]),
            "top": [{"text": data.texts[t], "text_index": t, "score": float(i2t[i, t]),
                     "itc": float(itc[i, t]), "match": t in data.img2txt[i]} for t in hits],
        })  # fmt: skip
    write_jsonl(out_dir / PREDICTIONS, rows)
    write_json(out_dir / METRICS, metrics)

    queries = [t for t in range(len(data.texts)) if data.txt2img[t]]
    shown = queries[:: max(1, len(queries) // N_QUERIES_SHOWN)][:N_QUERIES_SHOWN]
    grid = [(data.texts[t], [Sample(data.images[i], f"#{r + 1} {t2i[t, i]:.2f}", i in data.txt2img[t])
                             for r, i in enumerate(_top(t2i[t], N_HITS_SHOWN))]) for t in shown]
    retrieval_grid(out_dir / SAMPLES, grid, title=f"retrieval: {data_name} (green: matches the text)")

    def line(name: str, m: dict[str, float]) -> list[Any]:
        return [name] + [m[f"txt_r{k}"] for k in KS] + [m[f"img_r{k}"] for k in KS] + [m["r_mean"]]

    recall = md_table(["scores", "TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean"],
                      [line("ITC", metrics["itc"]),
                       line(f"ITC + ITM re-rank (top {k_test})", metrics["itm_rerank"])])
    if data.multi_image_texts:
        recall += ("\n\nA text describes many images: IR@K counts a text as found when any of its images is "
                   "in its top K.")
    sections = [("Recall (x100)", recall)]
    if data.multi_image_texts:
        sections.append(("Precision@K of text -> image (x100, mean over texts)", md_table(
            ["scores", "P@1", "P@5", "P@10"],
            [[name] + [metrics[key][f"precision_at_{k}"] for k in KS]
             for name, key in (("ITC", "itc"), ("ITC + ITM re-rank", "itm_rerank"))])))
        sections.append(("Precision@10 per text (x100)", md_table(
            ["text", "images", "ITC", "re-ranked"],
            [[text, v["n_images"], v["itc"], v["itm_rerank"]]
             for text, v in metrics["precision_at_10_per_text"].items()])))
    examples = [[data.texts[t], int(ir[t]) + 1, ", ".join(Path(data.images[i]).name for i in _top(t2i[t], 3))]
                for t in queries[:10]]
    sections.append(("Examples (text -> image, re-ranked)",
                     md_table(["text", "rank of first match", "top 3 images"], examples)))
    sections.append(("Top results", f"![top results]({SAMPLES})\n\nGreen frame: the image matches the text."))
    report = Report(
        "Retrieval evaluation",
        {"model": model_name, "data": data_name, "images": len(data.images), "texts": len(data.texts),
         "k_test": k_test, "ITM pairs scored": s.itm_pairs, "time (s)": metrics["seconds"]},
        sections,
    )
    write_report(out_dir / REPORT, report)
    m = metrics["itm_rerank"]
    summary = [f"retrieval on {data_name}: {len(data.images)} images, {len(data.texts)} texts",
               f"  ITC        TR@1 {metrics['itc']['txt_r1']:.2f}  IR@1 {metrics['itc']['img_r1']:.2f}",
               f"  re-ranked  TR@1 {m['txt_r1']:.2f}  IR@1 {m['img_r1']:.2f}  mean recall {m['r_mean']:.2f}"]
    if data.multi_image_texts:
        summary.append(f"  precision@10 (text -> image): ITC {metrics['itc']['precision_at_10']:.2f}  "
                       f"re-ranked {m['precision_at_10']:.2f}")
    return EvalResult("retrieval", out_dir, metrics, summary)
