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

Part "labeling" (`bench_labeling`): captioning a folder of generated JPEGs of mixed sizes (320x240 to 1600x1200,
seeded, with a photo's noise) end to end, files in and a .txt sidecar per image written, with
`blip2.collections.label_images` against the loop a transformers user writes (`Blip2Processor.from_pretrained`,
PIL `Image.open`, a batch of 8, `generate(**inputs, max_new_tokens=M, num_beams=1)`, `batch_decode`, one
`write_text` per image), on the same weights: bench_inference.py's mid-size random model (its `cached_checkpoint`,
saved once under runs/bench/mid-random), which transformers' `Blip2ForConditionalGeneration` loads as is.
Same decoding on both sides: greedy, M new tokens, transformers' defaults for the rest (min_new_tokens 0; ours
defaults to 1 and is given 0); no prompt (transformers puts image tokens + BOS before the new tokens, ours an
empty prompt: BOS after the soft prompt). Model loading is timed apart. After one warm-up batch on each side,
each timed pass labels all images; with `--label-reps` > 1 the order alternates (transformers first on even
passes, ours first on odd). Every label must be identical, else the run fails. Threads (`--threads`) are the same
for both; ours also decodes in `--workers` processes (the reader's default: min(4, CPUs)), as `blip2 label` does.

Memory: n x Q x dim x 4 bytes per copy. The default model is Q=8, dim=256: 1M images = 8 GB per copy, over
this 24 GB machine's share once the IVF copy and the generated data sit beside it, so the default run uses
Q=8 x dim=64 (2 GB per copy at 1M); `--dim 256` gives the real shape where memory allows. HNSW is built only
up to `--hnsw-max` images (its graph build dominates on 2 cores).

    python benchmarks/bench_collections.py                     # all parts, sizes 10k, 100k, 1M, 256 to label
    python benchmarks/bench_collections.py --quick             # smoke run: 10k only, 16 images, 24 to label
    python benchmarks/bench_collections.py --parts search --sizes 10000,100000
    python benchmarks/bench_collections.py --parts labeling --label-images 256 --threads 1 --workers 2
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


def write_jpegs(folder: Path, n: int, start: int = 0, sizes: list[tuple[int, int]] | None = None,
                noise: float = 0.0) -> None:
    """n JPEGs, coloured discs on a plain ground: 640x480, or each a seeded pick of `sizes`. `noise` (std of
    added Gaussian noise) gives them a photo's texture: a flat picture compresses and decodes faster than a photo."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        w, h = sizes[int(rng.integers(len(sizes)))] if sizes else (640, 480)
        im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(3):  # at 640x480: x in [60, 580), y in [60, 420), r in [30, 120)
            x, y, r = (int(v) for v in rng.integers((w * 3 // 32, h // 8, h // 16), (w - w * 3 // 32, h - h // 8, h // 4)))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        if noise:
            arr = np.asarray(im, np.float32) + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
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


# ------------------------------------------------------------------------------------------- labeling

LABEL_SIZES = [(320, 240), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (480, 640), (1200, 1600)]


def bench_labeling(args) -> dict:
    import torch
    import transformers
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    import blip2
    from blip2.collections import label_images

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_inference as bi  # the mid-size random model

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count())
    folder = bi.cached_checkpoint(args.model_cache or bi.MID_CACHE)
    t0 = time.perf_counter()
    hf = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = Blip2Processor.from_pretrained(folder)  # BlipImageProcessorPil where torchvision is absent
    theirs_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = blip2.load(folder)
    ours_load_s = time.perf_counter() - t0
    batch, tokens = args.label_batch_size, args.label_tokens
    split = {"preprocess_s": 0.0, "generate_s": 0.0}  # where the transformers loop's time goes

    def theirs(paths: list[Path], out: Path) -> None:
        # What a transformers user writes: PIL, the processor, generate, batch_decode, one file per image.
        out.mkdir(exist_ok=True)
        for i in range(0, len(paths), batch):
            chunk = paths[i : i + batch]
            t = time.perf_counter()
            inputs = processor(images=[Image.open(p).convert("RGB") for p in chunk], return_tensors="pt")
            t1 = time.perf_counter()
            ids = hf.generate(**inputs, max_new_tokens=tokens, num_beams=1)
            split["preprocess_s"] += t1 - t
            split["generate_s"] += time.perf_counter() - t1
            for path, text in zip(chunk, processor.batch_decode(ids, skip_special_tokens=True)):
                (out / f"{path.stem}.txt").write_text(text.strip())

    def ours_label(paths: list[Path]) -> None:
        for p in paths:  # sidecars of an earlier pass: this one must label every image
            p.with_suffix(".txt").unlink(missing_ok=True)
        report = label_images(ours, paths, generation={"num_beams": 1, "max_new_tokens": tokens, "min_new_tokens": 0},
                              batch_size=batch, workers=args.workers, progress=False)
        if report.labeled != len(paths):
            raise RuntimeError(f"label_images labeled {report.labeled} of {len(paths)}: {report.failures[:3]}")

    def compare(paths: list[Path], out: Path) -> list[dict]:
        pairs = [(p.name, (out / f"{p.stem}.txt").read_text(), p.with_suffix(".txt").read_text()) for p in paths]
        return [{"image": n, "transformers": a, "ours": b} for n, a, b in pairs if a != b]

    work = Path(tempfile.mkdtemp(prefix="bench_labeling_"))
    try:
        t0 = time.perf_counter()
        write_jpegs(work / "photos", args.label_images, sizes=LABEL_SIZES, noise=8.0)
        write_jpegs(work / "warmup", batch, start=args.label_images, sizes=LABEL_SIZES, noise=8.0)
        photos, warm = sorted((work / "photos").glob("*.jpg")), sorted((work / "warmup").glob("*.jpg"))
        megapixels = sum(w * h for w, h in (Image.open(p).size for p in photos)) / 1e6
        print(f"labeling: {len(photos)} JPEGs ({megapixels / len(photos):.2f} MP, "
              f"{sum(p.stat().st_size for p in photos) / len(photos) / 1e3:.0f} kB on average) written in "
              f"{time.perf_counter() - t0:.0f}s; model load: transformers {theirs_load_s:.1f}s, ours {ours_load_s:.1f}s",
              flush=True)
        theirs(warm, work / "warmup-theirs")
        ours_label(warm)
        mismatches = compare(warm, work / "warmup-theirs")
        runs: dict[str, list[float]] = {"transformers": [], "ours": []}
        loads = []
        for rep in range(args.label_reps):
            sides = [("transformers", lambda: theirs(photos, work / "theirs")), ("ours", lambda: ours_label(photos))]
            for name, fn in sides if rep % 2 == 0 else sides[::-1]:
                if name == "transformers":
                    split.update(preprocess_s=0.0, generate_s=0.0)
                load = os.getloadavg()[0]
                t = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t)
                loads.append(round(load, 2))
                print(f"  pass {rep + 1}, {name}: {runs[name][-1]:.1f}s, "
                      f"{len(photos) / runs[name][-1]:.2f} images/s (load average {load:.1f} before)", flush=True)
            mismatches += compare(photos, work / "theirs")
        labels = [p.with_suffix(".txt").read_text() for p in photos]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    theirs_s, ours_s = float(np.median(runs["transformers"])), float(np.median(runs["ours"]))
    return {
        "model": f"bench_inference mid-size random ({sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M parameters)",
        "images": len(photos), "sizes": "x".join(map(str, LABEL_SIZES[0])) + " to " + "x".join(map(str, LABEL_SIZES[5]))
        + " (and portrait)", "mean_megapixels": round(megapixels / len(photos), 2), "batch_size": batch,
        "max_new_tokens": tokens, "decoding": "greedy, min_new_tokens 0 (transformers' default)",
        "threads": torch.get_num_threads(), "workers": args.workers, "passes": args.label_reps,
        "order": "warm-up batch on each side, then passes alternating which side goes first (transformers on pass 1)",
        "image_processor": type(processor.image_processor).__name__,
        "model_load_s": {"transformers": round(theirs_load_s, 1), "ours": round(ours_load_s, 1)},
        "transformers_s": [round(t, 2) for t in runs["transformers"]], "ours_s": [round(t, 2) for t in runs["ours"]],
        "transformers_images_per_s": round(len(photos) / theirs_s, 3), "ours_images_per_s": round(len(photos) / ours_s, 3),
        "ratio": round(theirs_s / ours_s, 3),
        "transformers_last_pass_split_s": {k: round(v, 2) for k, v in split.items()},
        "load_average_before_each_call": loads,
        "labels_compared": len(photos) * args.label_reps + len(warm), "mismatches": mismatches,
        "empty_labels": sum(not t for t in labels), "distinct_labels": len(set(labels)), "example_label": labels[0],
    }


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="index,search,labeling",
                   help="comma-separated: index, search, labeling (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10k images of embeddings, 16 real images to index, 24 to label")
    p.add_argument("--model", default="default", help="model for the index part (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128, help="generated JPEGs to index (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: the reader's)")
    p.add_argument("--label-images", type=int, default=256, help="generated JPEGs to label (default: %(default)s)")
    p.add_argument("--label-batch-size", type=int, default=8, help="images per generate call, both sides")
    p.add_argument("--label-tokens", type=int, default=20, help="max_new_tokens, both sides (default: %(default)s)")
    p.add_argument("--label-reps", type=int, default=1, help="timed labeling passes per side (median reported)")
    p.add_argument("--model-cache", type=Path, default=None,
                   help="where the mid-size random model is saved once (default: runs/bench/mid-random)")
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
        args.sizes, args.images, args.search_queries, args.label_images = [10_000], 16, 20, 24
    parts = set(args.parts.split(","))
    if unknown := parts - {"index", "search", "labeling"}:
        p.error(f"unknown part(s) {sorted(unknown)}: choose from index, search, labeling")
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                                "load_average": os.getloadavg()[0]}}
    if "index" in parts:
        report["index_build"] = bench_index_build(args)
        print(json.dumps(report["index_build"], indent=2), flush=True)
    if "search" in parts:
        report["search"] = bench_search(args)
    if "labeling" in parts:
        report["labeling"] = bench_labeling(args)
        print(json.dumps(report["labeling"], indent=2), flush=True)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        Path(args.out).write_text(json.dumps({**old, **report}, indent=2) + "\n")
        print(f"wrote {args.out}")
    if report.get("labeling", {}).get("mismatches"):
        print(f"labels differ: {len(report['labeling']['mismatches'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
