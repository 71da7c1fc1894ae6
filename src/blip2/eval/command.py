"""`blip2 eval vqa|caption|retrieval|chat`: the parser and the command, called from blip2.cli.

Only the standard library at import time (the CLI's `--help` must stay instant); the runners load when the
command runs. blip2.cli owns the model and generation options and how a model loads (device, dtype): it
passes them in, since nothing in blip2 imports the CLI (DESIGN §3).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

TASKS = {
    "vqa": "Answer a VQA set's questions; official VQA accuracy overall and per answer/question type.",
    "caption": "Caption a set's images; BLEU, METEOR, ROUGE-L, CIDEr (and colour/shape accuracy on "
               "easy-VQA).",
    "retrieval": "Image-text retrieval: ITC top-k re-ranked by ITM; TR@K and IR@K (and precision@K on "
                 "easy-VQA).",
    "chat": "Multi-turn chat: each conversation's questions asked in order in one session; VQA accuracy per "
            "turn and whole conversations right.",
}
DATA_HELP = {
    "vqa": "VQA JSONL ({image, question, answers}), VQAv2 questions + annotations JSON (two paths or their "
           "folder), easy-vqa:test / easy-vqa:train, or shapes-vqa:test (600 questions about newly rendered "
           "images)",
    "caption": "COCO caption annotations JSON, caption JSONL ({image, text: [references]}), or "
               "easy-vqa-captions:test / easy-vqa-captions:train",
    "retrieval": "a caption file (COCO JSON or JSONL; each image with its captions), or "
                 "easy-vqa-retrieval:test / easy-vqa-retrieval:train",
    "chat": "a conversation JSONL ({image, turns: [[question, answer], ...]}), or easy-vqa-chat:test / "
            "easy-vqa-chat:train",
}  # fmt: skip


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value


def add_eval_parser(subparsers, model_options: argparse.ArgumentParser,
                    generation_options: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]):
    """Add `eval` with its tasks to the CLI's subparsers; `func` runs the command."""
    text = "Evaluate a model on a dataset: predictions, metrics, a markdown report and sample images."
    p = subparsers.add_parser("eval", help=text, description=text)
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True, help="vqa, caption, retrieval or chat")
    for task, task_help in TASKS.items():
        parents = [model_options] if task == "retrieval" else [model_options, generation_options]
        t = tasks.add_parser(task, help=task_help, description=task_help, parents=parents)
        t.set_defaults(func=func)
        t.add_argument("--data", "-d", nargs="+", required=True, metavar="PATH_OR_NAME", help=DATA_HELP[task])
        t.add_argument("--image-root", default=None, metavar="DIR",
                       help="folder the data's image paths are relative to (default: the data file's folder)")
        unit = {"vqa": "questions", "chat": "conversations"}.get(task, "images")
        t.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help=f"only the first N {unit}, for a quick look")
        t.add_argument("--out", "-o", default=None, metavar="DIR",
                       help=f"folder for the results (default: outputs/eval-{task}-<timestamp>)")
        t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show progress bars (default: on a terminal only)")
        if task == "vqa":
            t.add_argument("--template", default=None,
                           help="prompt around each question, with {} for it (default: the LLM's, "
                                "'Question: {} Answer:' or 'Question: {} Short answer:')")
        if task == "caption":
            t.add_argument("--prompt", default=None, help="text the captions continue, e.g. 'a photo of'")
            t.add_argument("--metrics-backend", choices=("auto", "pycocoevalcap", "fallback"), default="auto",
                           help="caption scorer: pycocoevalcap (needs Java), a pure-Python fallback "
                                "(no METEOR), or auto: pycocoevalcap when Java runs (default: %(default)s)")
        if task == "retrieval":
            t.add_argument("--k-test", type=positive_int, default=128, metavar="K",
                           help="ITC candidates per query re-scored with ITM (default: %(default)s, "
                                "as LAVIS)")
    return p


def check_template(template: str | None) -> None:
    """A --template must hold one {} where the question goes (`blip2 ask` and `blip2 eval vqa`)."""
    if template is None:
        return
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError):
        filled = ""
    if "\0" not in filled:
        raise ValueError(f"--template {template!r} must hold one {{}} where the question goes, "
                         "e.g. 'Question: {} Answer:'.")


def run_eval(args: argparse.Namespace, load: Callable[[], Any], generation: dict[str, Any]) -> int:
    """Read the data (failing fast, before the model loads), load the model, run the task, report."""
    from blip2.eval import datasets
    from blip2.eval.report import METRICS, PREDICTIONS, REPORT, SAMPLES, check_out_dir, prepare_out_dir

    task, data_name = args.task, " ".join(args.data)
    check_out_dir(args.out)
    if task == "vqa":
        check_template(args.template)
    data = datasets.load(task, args.data, args.image_root, args.limit)
    model = load()
    out = prepare_out_dir(args.out, task)
    common = {"model_name": str(args.model), "data_name": data_name, "progress": args.progress}
    if task == "vqa":
        from blip2.eval.vqa import evaluate_vqa

        result = evaluate_vqa(model, data, out, generation=generation, template=args.template, **common)
    elif task == "caption":
        from blip2.eval.caption import evaluate_captions

        result = evaluate_captions(model, data, out, prompt=args.prompt, generation=generation,
                                   backend=args.metrics_backend, **common)
    elif task == "chat":
        from blip2.eval.chat import evaluate_chat

        result = evaluate_chat(model, data, out, generation=generation, **common)
    else:
        from blip2.eval.retrieval import evaluate_retrieval

        result = evaluate_retrieval(model, data, out, k_test=args.k_test, **common)
    wrote = f"wrote {out}/ ({PREDICTIONS}, {METRICS}, {REPORT}, {SAMPLES})"
    if args.json:
        print(json.dumps(result.metrics, indent=2, ensure_ascii=False))
        print(wrote, file=sys.stderr)
    else:
        print("\n".join(result.summary))
        print(wrote)
    return 0
