"""`blip2 label`: its options and its run. Standard library only at import time (the CLI builds its parser from
here and `blip2 --help` must stay instant); torch and the model load inside `run`.

The model options (--model, --device, --dtype, --batch-size, --json) and the generation options (--num-beams,
--max-new-tokens, ..., --sample) come from the CLI's shared parent parsers; this module adds the rest.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from blip2.collections.argtypes import non_negative_int

# The generation options of the CLI's shared parent parser, by their argparse names (None = unset).
GENERATION_ARGS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty",
                   "temperature", "top_p", "top_k", "seed")
DESCRIPTION = (
    "Label a collection: caption every image (or answer --question about it) and write the labels next to the "
    "images (<stem>.txt, the kohya convention) or into one manifest (--out labels.jsonl|.csv|.parquet). "
    "Resumable: images already labeled are skipped, so rerun the same command after an interruption. A bad file "
    "(unreadable, truncated, not an image, too large) is recorded with its error and the run goes on."
)


def _extensions(text: str) -> list[str]:
    exts = [e.strip() for e in text.split(",") if e.strip()]
    if not exts:
        raise argparse.ArgumentTypeError(f"give extensions such as jpg,png, got {text!r}")
    return [e if e.startswith(".") else f".{e}" for e in exts]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="DIR_OR_FILE",
                   help="folders (their image files) and image files (used whatever their suffix)")
    src = p.add_argument_group("which images")
    src.add_argument("-r", "--recursive", action="store_true", help="also the images in sub-folders")
    src.add_argument("--extensions", type=_extensions, default=None, metavar="EXT,EXT",
                     help="suffixes that count as images in folders "
                          "(default: jpg,jpeg,png,webp,bmp,gif,tif,tiff, any case)")
    src.add_argument("--files-from", default=None, metavar="LIST",
                     help="a text file naming images (or folders), one per line, relative to the current folder; "
                          "listed files that no longer exist are recorded as errors")
    what = p.add_argument_group("what to write")
    ask = what.add_mutually_exclusive_group()
    ask.add_argument("--question", "-q", default=None,
                     help="answer this question about each image instead of captioning it")
    ask.add_argument("--prompt", default=None, help="text each caption continues, e.g. 'a photo of'")
    what.add_argument("--template", default=None,
                      help="prompt around --question, with {} for it (default: the LLM's, 'Question: {} Answer:')")
    what.add_argument("--out", "-o", default=None, metavar="MANIFEST",
                      help="write one manifest (.jsonl, .csv or .parquet: path, label, model, settings, status, "
                           "error) instead of sidecar files")
    what.add_argument("--ext", default=".txt",
                      help="suffix of the sidecar files, e.g. .caption (default: %(default)s)")
    how = p.add_argument_group("existing labels (default: skip images already labeled, so a rerun resumes)")
    mode = how.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", dest="mode", action="store_const", const="overwrite",
                      help="label every image again, replacing its label")
    mode.add_argument("--append", dest="mode", action="store_const", const="append",
                      help="add the new label after the existing text")
    mode.add_argument("--prepend", dest="mode", action="store_const", const="prepend",
                      help="add the new label before the existing text")
    how.add_argument("--separator", default=" ", help="between old and new text with --append/--prepend "
                                                       "(default: a space; ', ' for tag lists)")
    how.add_argument("--prefix", default="", help="text put before every new label, e.g. 'photo of '")
    how.add_argument("--suffix", default="", help="text put after every new label")
    how.add_argument("--retry-failed", action="store_true",
                     help="label again the images a manifest recorded as errors (default: recorded once, skipped)")
    p.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="processes decoding images ahead of the model; 0 decodes in the main process "
                        "(default: min(4, CPUs))")
    p.set_defaults(mode="skip")
    from blip2.collections.ray_options import add_ray_arguments

    add_ray_arguments(p)


def generation(args: argparse.Namespace) -> dict[str, Any]:
    """Only the generation settings the user gave: the rest stay the library's defaults (as `blip2 caption`)."""
    gen = {name: getattr(args, name, None) for name in GENERATION_ARGS}
    gen = {name: value for name, value in gen.items() if value is not None}
    if getattr(args, "sample", None):
        gen["do_sample"] = True
    return gen


def run(args: argparse.Namespace, load_model: Callable[[], Any]) -> int:
    """Find the images, check the options, then load the model (`load_model()` -> a `Blip2`) and label.
    User mistakes raise FileNotFoundError / ValueError with one clear sentence, before the model loads."""
    from pathlib import Path

    from blip2.collections.label import label_images
    from blip2.collections.reader import IMAGE_EXTENSIONS, find_images

    if not args.inputs and args.files_from is None:
        raise ValueError("give folders or image files to label, or --files-from LIST")
    if args.template is not None and args.question is None:
        raise ValueError("--template shapes --question: give a question too")
    paths = find_images(args.inputs, recursive=args.recursive, extensions=args.extensions or IMAGE_EXTENSIONS,
                        files_from=args.files_from)
    if not paths:
        raise ValueError(f"no image files found in {', '.join(args.inputs)} (see --extensions, --recursive)")
    if args.out is not None:
        from blip2.collections.writers import ManifestWriter

        ManifestWriter(Path(args.out))  # a bad suffix or a missing pyarrow fails now, not after the model loads
    else:
        from blip2.collections.label import check_ext

        check_ext(args.ext)
    if getattr(args, "engine", "local") == "ray":  # actors load the model; this process writes the manifest
        from blip2.collections.ray_jobs import label_with_ray
        from blip2.collections.ray_options import load_settings, ray_settings

        report = label_with_ray(
            args.model, paths, out=args.out, question=args.question, prompt=args.prompt, template=args.template,
            mode=args.mode, prefix=args.prefix, suffix=args.suffix, separator=args.separator,
            retry_failed=args.retry_failed, generation=generation(args), batch_size=getattr(args, "batch_size", None) or 8,
            load_kwargs=load_settings(args), model_name=getattr(args, "model", None), **ray_settings(args),
        )
    else:
        report = label_images(
            load_model(), paths, question=args.question, prompt=args.prompt, template=args.template, out=args.out,
            ext=args.ext, mode=args.mode, prefix=args.prefix, suffix=args.suffix, separator=args.separator,
            retry_failed=args.retry_failed, generation=generation(args), batch_size=getattr(args, "batch_size", None),
            workers=args.workers, model_name=getattr(args, "model", None), progress=True,
        )

    if getattr(args, "json", False):
        print(json.dumps({
            "labeled": report.labeled, "skipped": report.skipped, "failed": report.failed, "total": report.total,
            "seconds": round(report.seconds, 3), "images_per_second": round(report.images_per_second, 3),
            "output": report.output, "failures": [{"path": p, "error": e} for p, e in report.failures],
        }, indent=2, ensure_ascii=False))
    else:
        print(report.summary())  # each failure was logged as it happened (stderr: blip2: warning: PATH: ERROR)
    return 0
