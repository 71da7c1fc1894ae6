"""Collections at scale: photo-index building and search latency (issue 12), one function per part.

Part "index" (`bench_index_build`): `update_index` with a real model (default: the packaged default model)
over generated JPEGs: images/s of a fresh build (decode workers + vision tower + Q-Former + faiss + SQLite),
of a no-op refresh (stat only) and of adding 10% more images.

Part "search" (`bench_search`): faiss alone, on synthetic embeddings shaped like the index's (every image
stores Q normalised query vectors), at several collection sizes: build time, memory, median latency of one
text query (k=10, the library's `vectors.search`: k*Q raw hits grouped by image) for the exact structure and
the approximate ones, and the approximate ones' recall@10 against exact. The embeddings are clustered (an
image's queries scatter around one of n/100 topic directions, queries are noisy topic directions), since
uniformly random vectors in many dimensions have no neighbours for an ANN index to find.

Memory: n x Q x dim x 4 bytes per copy. The default model is Q=8, dim=256: 1M images = 8 GB per copy, over
this 24 GB machine's share once the IVF copy and the generated data sit beside it, so the default run uses
Q=8 x dim=64 (2 GB per copy at 1M); `--dim 256` gives the real shape where memory allows. HNSW is built only
up to `--hnsw-max` images (its graph build dominates on 2 cores).

    python benchmarks/bench_collections.py                     # both parts, sizes 10k, 100k, 1M
    python benchmarks/bench_collections.py --quick             # smoke run: 10k only, 16 images
    python benchmarks/bench_collections.py --parts search --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "collections_cpu.json"


# ------------------------------------------------------------------------------------------- index building


def write_jpegs(folder: Path, n: int, start: int = 0) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        im = Image.new("RGB", (640, 480), tuple(int(c) for c in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, r = (int(v) for v in rng.integers((60, 60, 30), (580, 420, 120)))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        im.save(folder / f"photo{i:05d}.jpg", quality=90)


def bench_index_build(args) -> dict:
    import torch

    import blip2
    from blip2.collections.index import update_index

    torch.set_num_threads(args.threads or os.cpu_count())
    t0 = time.perf_counter()
    model = blip2.load(args.model, device=args.device, batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="bench_collections_"))
    try:
        write_jpegs(work / "photos", args.images)
        fresh = update_index(model, work / "idx", [work / "photos"], workers=args.workers, progress=False)
        noop = update_index(model, work / "idx", [work / "photos"], workers=args.workers, progress=False)
        extra = max(1, args.images // 10)
        write_jpegs(work / "photos", extra, start=args.images)
        grown = update_index(model, work / "idx", [work / "photos"], workers=args.workers, progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": args.model, "images": args.images, "batch_size": args.batch_size, "workers": args.workers,
        "threads": torch.get_num_threads(), "image_size": "640x480 JPEG", "model_load_s": round(load_s, 1),
        "fresh_build": {"seconds": round(fresh.seconds, 2), "images_per_s": round(args.images / fresh.seconds, 2),
                        "embedding_images_per_s": round(fresh.embedded_per_s, 2)},
        "noop_refresh": {"seconds": round(noop.seconds, 3), "images_per_s": round(args.images / noop.seconds, 1)},
        "add_10pct": {"images": extra, "seconds": round(grown.seconds, 2),
                      "images_per_s": round(extra / grown.seconds, 2)},
    }


# ------------------------------------------------------------------------------------------- search


def synthetic(n: int, q: int, dim: int, rng: np.random.Generator, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, q, dim) normalised float32 and the (n/100, dim) topics: each image's queries around one of n/100 topic directions."""
    topics = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    out = np.empty((n, q, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        topic = topics[rng.integers(0, len(topics), e - s)]  # (b, dim)
        x = topic[:, None, :] + rng.standard_normal((e - s, q, dim)).astype(np.float32)  # noise ~ signal
        out[s:e] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return out, topics


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def bench_search(args) -> list[dict]:
    import faiss

    from blip2.collections import vectors as vec

    faiss.omp_set_num_threads(args.threads or os.cpu_count())
    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(n)
        data, topics = synthetic(n, args.queries, args.dim, rng)
        qv = topics[rng.integers(0, len(topics), args.search_queries)]
        qv = qv + 0.5 * rng.standard_normal(qv.shape).astype(np.float32)
        qv /= np.linalg.norm(qv, axis=-1, keepdims=True)
        truth = None
        approx = args.approx_max is None or n <= args.approx_max
        structures = ["exact"] + (["ivf"] if approx else []) + (["hnsw"] if approx and n <= args.hnsw_max else [])
        for structure in structures:
            t0 = time.perf_counter()
            flat = data.reshape(-1, args.dim)
            index = vec.new_index(structure, args.dim, train=flat if structure == "ivf" else None)
            for s in range(0, n, 100_000):  # add in slices: no second full copy of the ids
                vec.add(index, np.arange(s, min(n, s + 100_000)), data[s : s + 100_000])
            build_s = time.perf_counter() - t0
            found, times = [], []
            vec.search(index, qv[0], 10, args.queries)  # warm-up
            for query in qv:
                t = time.perf_counter()
                found.append([i for i, _ in vec.search(index, query, 10, args.queries)])
                times.append(time.perf_counter() - t)
            row = {"images": n, "queries_per_image": args.queries, "dim": args.dim, "vectors": n * args.queries,
                   "structure": structure, "build_s": round(build_s, 2),
                   "index_gb": round(n * args.queries * args.dim * 4 / 1024**3, 3),
                   "latency_ms_median": round(1000 * float(np.median(times)), 2),
                   "latency_ms_p90": round(1000 * float(np.percentile(times, 90)), 2), "max_rss_gb": round(rss_gb(), 2)}
            if structure == "exact":
                truth = found
            else:
                row["recall_at_10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])), 4)
                if structure == "ivf":
                    row.update(nlist=index.nlist, nprobe=index.nprobe)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del index
        del data
    return rows


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="index,search", help="comma-separated: index, search (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 10k images of embeddings, 16 real images")
    p.add_argument("--model", default="default", help="model for the index part (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128, help="generated JPEGs to index (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: the reader's)")
    p.add_argument("--threads", type=int, default=0, help="torch/faiss threads (default 0: all cores)")
    p.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes for the search part")
    p.add_argument("--queries", type=int, default=8, help="query vectors per image (default model: 8)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default model: 256; see the docstring)")
    p.add_argument("--search-queries", type=int, default=100, help="timed text queries per index")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest collection that gets an HNSW index")
    p.add_argument("--approx-max", type=int, default=None,
                   help="largest collection that gets approximate indexes (default: all sizes)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.sizes, args.images, args.search_queries = [10_000], 16, 20
    parts = set(args.parts.split(","))
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                                "load_average": os.getloadavg()[0]}}
    if "index" in parts:
        report["index_build"] = bench_index_build(args)
        print(json.dumps(report["index_build"], indent=2), flush=True)
    if "search" in parts:
        report["search"] = bench_search(args)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        Path(args.out).write_text(json.dumps({**old, **report}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
