"""`blip2 index` and `blip2 search`: their options and their runs. Standard library only at import time (the
CLI builds its parser from here and `blip2 --help` must stay instant); torch, faiss and the model load inside
`run_index` / `run_search`. Both expect the CLI's model options too (--model, --device, --dtype,
--batch-size, --json, -v); a user mistake is a ValueError / FileNotFoundError, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from blip2.collections.argtypes import non_negative_float, non_negative_int, positive_int

KINDS = ("auto", "exact", "hnsw", "ivf")  # collections.vectors.KINDS, without importing faiss


# ------------------------------------------------------------------------------------------- blip2 index

INDEX_HELP = ("Build or refresh a photo index of folders: every image's ITC query vectors in faiss. New files "
              "are added, deleted ones removed, changed ones embedded again; an interrupted run resumes.")


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="DIR_OR_FILE", help="image folders and files to index")
    p.add_argument("--out", "-o", required=True, metavar="INDEX", help="the index folder (created if new)")
    p.add_argument("--recursive", "-r", action="store_true", help="also index the folders' sub-folders")
    p.add_argument("--files-from", default=None, metavar="FILE", help="also index the paths listed in FILE, one a line")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="auto: exact search up to 100,000 images, IVF beyond; exact; hnsw; ivf "
                        "(default: the index's own; auto for a new one)")
    p.add_argument("--prune", action="store_true",
                   help="remove every image not among this run's inputs (default: only files that no longer exist)")
    p.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="image decoding processes (default: min(4, CPUs); 0 decodes in this process)")
    p.add_argument("--commit-every", type=non_negative_float, default=30.0, metavar="S",
                   help="seconds between saves; a killed run redoes at most this much (default: %(default)s)")
    from blip2.collections.ray_options import add_ray_arguments

    add_ray_arguments(p)


def run_index(args: argparse.Namespace, load_model: Callable[[], object]) -> int:
    """`load_model()` returns the loaded `Blip2` (called after the cheap checks)."""
    if not args.inputs and not args.files_from:
        raise ValueError("give image folders or files to index (or --files-from FILE)")
    for item in args.inputs:
        if not Path(item).exists():
            raise FileNotFoundError(f"{item} does not exist (give image files or folders of images)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the index")
    from blip2.collections.index import update_index

    blip2 = load_model()
    common = {"recursive": args.recursive, "files_from": args.files_from, "kind": args.kind, "prune": args.prune,
              "commit_every": args.commit_every, "model_name": getattr(args, "model", None)}
    if getattr(args, "engine", "local") == "ray":  # actors embed, this process writes the index
        from blip2.collections.ray_jobs import index_with_ray
        from blip2.collections.ray_options import load_settings, ray_settings

        report = index_with_ray(blip2, args.model, out, args.inputs, batch_size=getattr(args, "batch_size", None) or 8,
                                load_kwargs=load_settings(args), **ray_settings(args), **common)
    else:
        report = update_index(blip2, out, args.inputs, batch_size=getattr(args, "batch_size", None),
                              workers=args.workers, **common)
    if getattr(args, "json", False):
        print(json.dumps({"index": str(out), **report.to_dict()}, indent=2, ensure_ascii=False))
        return 0
    rate = f", {report.embedded_per_s:.1f} images/s" if report.embedded_per_s else ""
    print(f"{out}: {report.images} images ({report.structure}); added {report.added}, updated {report.updated}, "
          f"removed {report.removed}, unchanged {report.unchanged}, failed {len(report.failed)} "
          f"in {report.seconds:.1f} s{rate}")
    if report.repaired:
        print(f"  repaired {report.repaired} entries left inconsistent by an interrupted run")
    for path, error in report.failed:
        print(f"  skipped {path}: {error}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- blip2 search

SEARCH_HELP = ("Search a photo index with a text (ITC over every query vector, top hits re-ranked by ITM) "
               "or with an example image (--image).")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX", help="an index folder made by `blip2 index`")
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="what to look for")
    p.add_argument("-k", type=positive_int, default=20, metavar="N", help="images to return (default: %(default)s)")
    p.add_argument("--image", default=None, metavar="FILE", help="search by example: images like this one")
    p.add_argument("--no-rerank", dest="rerank", action="store_false",
                   help="rank by ITC cosine only (faster: no image is read again)")
    p.add_argument("--rerank-k", type=positive_int, default=128, metavar="N",
                   help="top ITC candidates re-ranked by ITM (default: %(default)s, LAVIS' k_test)")
    p.add_argument("--html", default=None, metavar="FILE", help="also write a contact sheet (thumbnails, scores)")


def format_hits(hits) -> str:
    lines = [f"{'rank':>4}  {'score':>8}  {'match':>6}  {'cosine':>7}  path"]
    for h in hits:
        match = f"{h.itm:6.3f}" if h.itm is not None else f"{'-':>6}"
        lines.append(f"{h.rank:>4}  {h.score:8.4f}  {match}  {h.itc:7.4f}  {h.path}")
    return "\n".join(lines)


def run_search(args: argparse.Namespace, load_model: Callable[[], object]) -> int:
    if (args.text is None) == (args.image is None):
        raise ValueError("give a TEXT to search for or --image FILE, one of the two")
    folder = Path(args.index)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder} is not a photo index (build one with `blip2 index IMAGES… --out {folder}`)")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"image file {args.image} does not exist")
    from blip2.collections.index import PhotoIndex
    from blip2.collections.search import search

    with PhotoIndex.open(folder) as index:
        blip2 = load_model()
        hits = search(blip2, index, text=args.text, image=args.image, k=args.k, rerank=args.rerank,
                      rerank_k=args.rerank_k)
    query = args.text if args.text is not None else f"images like {args.image}"
    if args.html:
        from blip2.collections.html import write_contact_sheet

        write_contact_sheet(args.html, hits, query, str(folder))
    if getattr(args, "json", False):
        print(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
    else:
        print(format_hits(hits))
        if args.html:
            print(f"wrote {args.html}", file=sys.stderr)
    return 0
