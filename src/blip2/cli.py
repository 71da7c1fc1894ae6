"""`blip2 …`: caption, ask, chat, itm, retrieve, eval and convert from the command line.

Only the standard library is imported at module level: torch, transformers and the model code load inside
the command functions, so `blip2 --help` is instant (DESIGN §3). A user mistake (missing or unreadable
image, unknown model, wrong kind of checkpoint) ends in one `blip2: error: …` line on stderr and a non-zero
exit, never a traceback (STYLE "Errors for people"); a genuine bug still shows its traceback, and `--debug`
shows one for every error. Stdout holds the results; stderr only our notes, our progress bars on long work and
real warnings, unless `-v` lets the libraries' logs and progress bars through (`_library_output`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Standard library only at import time, like this file: the argument checks `blip2 eval` shares.
from blip2.eval.command import check_template, positive_int

EXIT_ERROR = 1  # a user mistake found at run time
EXIT_USAGE = 2  # bad command line (argparse's code)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CliError(Exception):
    """A user mistake the command line itself finds (a missing file, a bad option value)."""


class _Parser(argparse.ArgumentParser):
    """argparse with our error line: `blip2: error: …` and a pointer to the help, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"blip2: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


# ------------------------------------------------------------------------------------- argument types


def _number(text: str, cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Any:
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number of 0 or more")


def _real(text: str) -> float:
    return _number(text, float, lambda v: v == v, "a number")  # v == v: not NaN


def _positive_real(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number above 0")


def _probability(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "in (0, 1]")


def _seed(text: str) -> int:
    # torch.manual_seed's range (unsigned 64-bit), as the Python API checks it (inference/generation.py)
    return _number(text, int, lambda v: 0 <= v < 2**64, "a whole number from 0 to 2**64 - 1")


def _device_map(text: str) -> str | dict:
    """accelerate's strategies, or a JSON object {LLM module name: device} (devices: N, "cpu", "disk")."""
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        mapping = json.loads(text)
    except ValueError:
        mapping = None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not auto, balanced, balanced_low_0, sequential or a JSON object like '{{\"\": 0}}'")
    return mapping


def _max_memory(text: str) -> dict:
    """'0=20GiB,1=20GiB,cpu=60GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)."""
    out: dict = {}
    for part in text.split(","):
        where, _, amount = part.partition("=")
        if not where.strip() or not amount.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: give DEVICE=AMOUNT pairs, e.g. 0=20GiB,cpu=60GiB")
        where = where.strip()
        out[int(where) if where.isdigit() else where] = amount.strip()
    return out


def _device_name(text: str) -> str:
    if text in ("auto", "cpu", "cuda", "mps") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r} (auto, cpu, cuda, cuda:N, mps)")


# (flag, type, metavar, help) of the generation settings. Unset (None) keeps the library's defaults
# (REFERENCE §6: captions 5 beams / 30 tokens, answers 5 beams / 10 tokens / length penalty -1).
GENERATION_FLAGS = (
    ("--num-beams", positive_int, "N", "beams for beam search (default: 5)"),
    ("--max-new-tokens", positive_int, "N", "most tokens to generate (default: 30 captions, 10 answers)"),
    ("--min-new-tokens", _non_negative_int, "N", "fewest tokens to generate (default: 1)"),
    ("--length-penalty", _real, "X", "beam-search length penalty (default: 1 captions, -1 answers)"),
    ("--repetition-penalty", _positive_real, "X", "penalty on repeated tokens; 1 means none"),
    ("--temperature", _positive_real, "T", "sampling temperature (with --sample)"),
    ("--top-p", _probability, "P", "nucleus sampling: the fewest tokens holding this mass (with --sample)"),
    ("--top-k", _non_negative_int, "K", "sample from the K most likely tokens only; 0 means no limit "
                                        "(with --sample)"),
    ("--seed", _seed, "N", "seed for --sample, so a run can be repeated: the same seed, settings and "
                           "images give the same text"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# -------------------------------------------------------------------------------------------- helpers


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text or type(err).__name__


def _check_image_files(paths: Sequence[str]) -> None:
    """Fail fast, before the model loads: every path must be an existing file."""
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise CliError(f"image file {path} does not exist")
        if p.is_dir():
            raise CliError(f"{path} is a directory, not an image file")


def _expand_images(items: Sequence[str]) -> list[str]:
    """Files as given; directories become their image files (by suffix, sorted, not recursive)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in directory {item}")
            out += found
        elif p.exists():
            out.append(item)
        else:
            raise CliError(f"image file or directory {item} does not exist")
    return out


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    """Only the generation settings the user gave: the rest stay the library's defaults."""
    gen = {_dest(flag): getattr(args, _dest(flag)) for flag, *_ in GENERATION_FLAGS}
    gen = {key: value for key, value in gen.items() if value is not None}
    if args.sample:
        gen["do_sample"] = True
    return gen


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CliError("--device mps: MPS is not available on this machine; use --device cpu")
    return name


def _resolve_dtype(name: str, device: str) -> str:
    if name != "auto":
        return name
    if device.startswith("cuda"):
        import torch

        # bf16 where the GPU has it (fp16 overflows in T5), as LAVIS runs the frozen parts in half precision.
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _load(args: argparse.Namespace):
    import blip2

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    return blip2.load(args.model, device=device, dtype=dtype, batch_size=args.batch_size,
                      device_map=getattr(args, "device_map", None), max_memory=getattr(args, "max_memory", None),
                      quantize=getattr(args, "quantize", None),
                      compile_decode=getattr(args, "compile_decode", False))


def _print_json(rows: Any) -> None:
    print(json.dumps(rows, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------- library output

# Read by the libraries when they are first imported, which is after main() starts: torch and transformers
# load inside the commands. A variable the user already set wins.
QUIET_ENV = {
    # transformers' loaders and tokenizers log INFO/WARNING advice meant for their own developers.
    "TRANSFORMERS_VERBOSITY": "error",
    # transformers' "Loading weights" / "Writing model shards" bars and huggingface_hub's follow this switch.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # tqdm's default for bars made without `disable=`, e.g. transformers' GGUF dequantizer, which calls tqdm
    # directly. Our bars always pass `disable=`, which wins over this default, so they still show.
    "TQDM_DISABLE": "1",
}
# These set up logging themselves (timestamps, log levels): they get no `blip2: note:` handler.
OWN_LOGGING = ("train", "cache-features", "serve")


class _NoteFormatter(logging.Formatter):
    """Our library's log records as the CLI's own lines: `blip2: note: …`, `blip2: warning: …`."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"blip2: {kind}: {record.getMessage()}"


@contextmanager
def _library_output(verbose: bool, notes: bool) -> Iterator[None]:
    """While a command runs: the libraries quiet unless `verbose` (then as they are by default: their warnings
    and progress bars), Python warnings only from our own modules unless `verbose` or the user chose with
    -W / PYTHONWARNINGS, and with `notes` (for commands that leave logging to us) the `blip2.*` loggers'
    INFO records on stderr and other loggers at ERROR. Everything is put back afterwards, for callers of main()
    in-process."""
    env = {} if verbose else {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    os.environ.update(env)
    root, ours = logging.getLogger(), logging.getLogger("blip2")
    levels = root.level, ours.level
    handler = None
    if notes:
        if not verbose:
            root.setLevel(logging.ERROR)  # other libraries' loggers (accelerate, PIL, ...) inherit it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_NoteFormatter())
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            if not verbose and not sys.warnoptions:
                # A warning counts as ours when it is attributed to a blip2 module, as warnings raised by our
                # code (or about our calls) are; torch's and transformers' own internals stay quiet.
                warnings.filterwarnings("ignore")
                warnings.filterwarnings("default", module=r"blip2(\.|$)")
            yield
    finally:
        for key in env:
            os.environ.pop(key, None)
        if handler is not None:
            ours.removeHandler(handler)
        root.setLevel(levels[0])
        ours.setLevel(levels[1])


# ------------------------------------------------------------------------------------------- commands


def cmd_caption(args: argparse.Namespace) -> int:
    _check_image_files(args.images)
    model = _load(args)
    captions = model.caption(args.images, prompt=args.prompt, **_generation(args))
    if args.json:
        _print_json([{"image": path, "caption": text} for path, text in zip(args.images, captions)])
    else:
        for path, text in zip(args.images, captions):
            print(f"{path}: {text}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    _check_image_files([args.image])
    check_template(args.template)
    model = _load(args)
    answers = model.ask(args.image, args.questions, template=args.template, **_generation(args))
    if args.json:
        rows = [{"image": args.image, "question": q, "answer": a} for q, a in zip(args.questions, answers)]
        _print_json(rows)
    else:
        for question, answer in zip(args.questions, answers):
            print(answer if len(args.questions) == 1 else f"{question} -> {answer}")
    return 0


CHAT_HELP = "/reset clears the conversation, /quit (or end of input) leaves"


def _chat_turn(session, question: str) -> str:
    """One answer; the session's warnings (old turns dropped) become note lines on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer = session.ask(question)
    for w in caught:
        if issubclass(w.category, UserWarning) and str(w.message).startswith("chat context full"):
            print(f"blip2: note: {w.message}", file=sys.stderr)
        else:  # not ours: let it through as Python would have shown it
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return answer


def _read_line(interactive: bool) -> str | None:
    """The next line of input, None at the end. A terminal gets a prompt (and line editing via input())."""
    if not interactive:
        return sys.stdin.readline() or None
    try:
        return input("you> ")
    except EOFError:
        print(file=sys.stderr)
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    _check_image_files([args.image])
    model = _load(args)
    session = model.chat(args.image, **_generation(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting about {args.image}; {CHAT_HELP}", file=sys.stderr)
    failed = False
    while (line := _read_line(interactive)) is not None:
        question = line.strip()
        if not question:
            continue
        if question in ("/quit", "/exit"):
            break
        if question == "/reset":
            session.reset()
            print("blip2: note: conversation cleared (the image stays)", file=sys.stderr)
            continue
        if question.startswith("/") and question[1:].isalpha():
            print(f"blip2: note: unknown command {question}: {CHAT_HELP}", file=sys.stderr)
            continue
        try:
            answer = _chat_turn(session, question)
        except ValueError as err:  # e.g. a question longer than the context: the chat goes on
            print(f"blip2: error: {_one_line(err)}", file=sys.stderr)
            failed = True
            continue
        if args.json:  # one object per line (JSON Lines), so answers stream
            row = {"image": args.image, "question": question, "answer": answer}
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"blip2> {answer}" if interactive else answer)
        sys.stdout.flush()
    return EXIT_ERROR if failed else 0


def cmd_itm(args: argparse.Namespace) -> int:
    _check_image_files([args.image])
    model = _load(args)
    itm = model.itm(args.image, args.texts)
    itc = model.similarity(args.image, args.texts)[0].tolist()  # (n_texts,)
    if args.json:
        _print_json(
            [{"image": args.image, "text": t, "itm": p, "itc": s} for t, p, s in zip(args.texts, itm, itc)]
        )
    else:
        for text, p, s in zip(args.texts, itm, itc):
            print(f"{text}: match {p:.4f}  similarity {s:.4f}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    paths = _expand_images(args.images)
    model = _load(args)
    results = model.retrieve(args.texts, paths, k=args.k, rerank=args.rerank)
    # The ranking score (ITM logit + ITC cosine, REFERENCE §6) has no unit a reader knows; the ITM probability
    # does, as in `blip2 itm` (retrieve computes it with the re-ranking).
    probs = [[m.itm for m in matches] for matches in results]
    if args.json:
        _print_json([
            {"text": text, "rank": rank, "image": paths[m.index], "itm": p, "itc": m.itc, "score": m.score}
            for text, matches, ps in zip(args.texts, results, probs)
            for rank, (m, p) in enumerate(zip(matches, ps), 1)
        ])
        return 0
    several = len(args.texts) > 1
    for i, (text, matches, ps) in enumerate(zip(args.texts, results, probs)):
        if several:
            print(("\n" if i else "") + f"{text}:")
        for m, p in zip(matches, ps):
            print(f"{'  ' if several else ''}{paths[m.index]}: match {p:.4f}  similarity {m.itc:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from blip2.eval.command import run_eval

    generation = _generation(args) if args.task != "retrieval" else {}
    return run_eval(args, load=lambda: _load(args), generation=generation)


def cmd_train(args: argparse.Namespace) -> int:
    from blip2.recipes import run_recipe

    return run_recipe(args.recipe, args.rest)


def cmd_cache_features(args: argparse.Namespace) -> int:
    from blip2.recipes import run_recipe

    return run_recipe("cache-features", args.rest)


def cmd_label(args: argparse.Namespace) -> int:
    from blip2.collections.label_command import run

    return run(args, lambda: _load(args))


def cmd_index(args: argparse.Namespace) -> int:
    from blip2.collections.index_command import run_index

    return run_index(args, lambda: _load(args))


def cmd_search(args: argparse.Namespace) -> int:
    from blip2.collections.index_command import run_search

    return run_search(args, lambda: _load(args))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CliError("blip2 serve needs the serve extra: pip install 'blip2[serve]'") from None
    from blip2.serve.server import build_config, run

    config = build_config(args)  # bad flag values fail here, before the model loads
    if args.ray_replicas is not None:  # each Ray Serve replica loads the model; this process only deploys
        from blip2.serve.ray_serve import serve_with_ray

        return serve_with_ray(args, config)
    return run(args, config, _load(args))


def cmd_convert(args: argparse.Namespace) -> int:
    if not Path(args.src).is_file():
        raise CliError(f"LAVIS checkpoint {args.src} does not exist (give the .pth file)")
    try:
        from blip2.convert.lavis_convert import convert_lavis
    except ModuleNotFoundError as err:
        if err.name != "blip2.convert.lavis_convert":
            raise
        missing = "LAVIS conversion is not in this install (blip2.convert.lavis_convert is missing)"
        raise CliError(missing) from None
    extra = {k: getattr(args, k) for k in ("qformer_tokenizer", "qformer_heads", "vision_heads")}
    extra = {k: v for k, v in extra.items() if v is not None}
    folder = convert_lavis(args.src, args.dst, llm=args.llm, vision=args.vision, **extra)
    print(f"wrote {folder or args.dst}")
    return 0


# --------------------------------------------------------------------------------------------- parser


VERBOSE_HELP = "also show the libraries' logs, progress bars and warnings (transformers, torch, huggingface_hub)"


def _add_verbose(group) -> None:
    # SUPPRESS: unset after the command leaves `blip2 -v COMMAND` as given, so -v works on either side.
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model options")
    g.add_argument("--model", "-m", default="default", metavar="NAME_OR_DIR",
                   help="checkpoint folder, hub name (e.g. Salesforce/blip2-opt-2.7b) or 'default' "
                        "(default: %(default)s)")
    g.add_argument("--device", type=_device_name, default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: %(default)s: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="precision of the frozen parts; the Q-Former stays float32 "
                        "(default: %(default)s: bfloat16/float16 on CUDA, float32 elsewhere)")
    g.add_argument("--device-map", type=_device_map, default=None, metavar="MAP",
                   help="spread the language model over GPUs, CPU memory and disk: auto, balanced, "
                        "balanced_low_0, sequential or a JSON {module: device} (default: all on --device)")
    g.add_argument("--max-memory", type=_max_memory, default=None, metavar="DEV=SIZE,...",
                   help="memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    g.add_argument("--quantize", choices=("8bit", "4bit"), default=None,
                   help="load the language model in 8-bit or 4-bit (CUDA and bitsandbytes only; "
                        "the rest in --dtype)")
    g.add_argument("--compile-decode", action="store_true",
                   help="greedy/sampled decoding on a static key/value cache with a compiled forward "
                        "(decoder-only LLMs; the first call per batch shape compiles, seconds to a minute)")
    g.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="images (and prompts) per forward pass (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    _add_verbose(g)
    return p


def _generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation options (unset: the library's defaults)")
    for flag, kind, metavar, text in GENERATION_FLAGS:
        g.add_argument(flag, type=kind, default=None, metavar=metavar, help=text)
    g.add_argument("--sample", action="store_true", default=None,
                   help="sample instead of searching (with the default 5 beams this is beam sampling; "
                        "add --num-beams 1 for plain sampling)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from blip2 import __version__

    parser = _Parser(
        prog="blip2",
        description="BLIP-2 from the command line: caption images, answer questions, chat, match, retrieve.",
        epilog="Run `blip2 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"blip2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback for every error")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model, gen = _model_options(), _generation_options()

    def add(name: str, fn: Callable[[argparse.Namespace], int], text: str, parents: list):
        p = sub.add_parser(name, help=text, description=text, parents=parents)
        p.set_defaults(func=fn)
        return p

    p = add("caption", cmd_caption, "Describe each image in a sentence.", [model, gen])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to caption")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")

    p = add("ask", cmd_ask, "Answer questions about one image (the image is encoded once).", [model, gen])
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more questions")
    p.add_argument("--template", default=None,
                   help="prompt around each question, with {} for it (default: the LLM's, "
                        "'Question: {} Answer:' or 'Question: {} Short answer:')")

    text = (f"Talk about one image: questions from stdin, one per line; answers on stdout. "
            f"{CHAT_HELP[0].upper()}{CHAT_HELP[1:]}. With --json, one JSON object per answer.")
    p = add("chat", cmd_chat, text, [model, gen])
    p.add_argument("image", metavar="IMAGE", help="the image file")

    text = "How well each text matches one image: ITM match probability and ITC similarity."
    p = add("itm", cmd_itm, text, [model])
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="one or more texts")

    text = ("The images that best match each text, best first: the ITC top candidates re-ranked by ITM logit + "
            "ITC cosine. Shows each image's ITM match probability and ITC similarity, as `blip2 itm` does; "
            "--json adds the ranking score as `score`.")
    p = add("retrieve", cmd_retrieve, text, [model])
    p.add_argument("texts", nargs="+", metavar="TEXT", help="one or more texts to search for")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files and/or directories (their image files, not recursive)")
    p.add_argument("-k", type=positive_int, default=5, help="images to show per text (default: %(default)s)")
    p.add_argument("--rerank", type=positive_int, default=128, metavar="N",
                   help="ITC candidates re-scored with ITM (default: %(default)s)")

    from blip2.eval.command import add_eval_parser  # standard library only, like this file

    add_eval_parser(sub, model, gen, cmd_eval)

    text = ("Train the bridge with a recipe: stage1, stage2, or the paper fine-tunes caption, vqa, retrieval "
            "(stage2/stage1 with configs/finetune_*.yaml first); its own --help lists the settings.")
    p = add("train", cmd_train, text, [])
    p.add_argument("recipe", choices=["stage1", "stage2", "caption", "vqa", "retrieval"], help="which recipe to run")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="--config FILE [--resume [PATH]] [key=value ...]")
    text = ("Run the frozen image encoder once over a dataset's images and store its outputs, for training "
            "with data.augment=false data.feature_cache=FOLDER.")
    p = add("cache-features", cmd_cache_features, text, [])
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="--model M --data FILE|easy-vqa:train --out FOLDER [--format pairs|coco|vqa] (see --help)")

    from blip2.collections import label_command
    from blip2.collections.index_command import INDEX_HELP, SEARCH_HELP, add_index_arguments, add_search_arguments

    label_command.add_arguments(add("label", cmd_label, label_command.DESCRIPTION, [model, gen]))

    add_index_arguments(add("index", cmd_index, INDEX_HELP, [model]))
    add_search_arguments(add("search", cmd_search, SEARCH_HELP, [model]))

    text = ("Serve the model over HTTP: OpenAI-compatible /v1/chat/completions, /v1/embeddings and /v1/models, "
            "BLIP-2's /v1/caption, /v1/ask, /v1/itm, /v1/retrieve, a web page at /, /health and /metrics.")
    p = add("serve", cmd_serve, text, [model])
    from blip2.serve.server import add_arguments as add_serve_arguments

    add_serve_arguments(p)

    text = "Convert a LAVIS .pth checkpoint into a folder that blip2 (and transformers) loads."
    p = add("convert", cmd_convert, text, [])
    _add_verbose(p)
    p.add_argument("src", metavar="SRC", help="the LAVIS checkpoint (.pth)")
    p.add_argument("dst", metavar="DST", help="the folder to write")
    p.add_argument("--llm", default=None, metavar="NAME_OR_DIR",
                   help="the frozen LLM of a stage-2 checkpoint, e.g. facebook/opt-2.7b or google/flan-t5-xl")
    p.add_argument("--vision", default=None, metavar="NAME_OR_DIR",
                   help="a BLIP-2 folder or hub name with the same EVA ViT, when SRC holds none "
                        "(LAVIS does not save it), e.g. Salesforce/blip2-opt-2.7b")
    p.add_argument("--qformer-tokenizer", default=None, metavar="NAME_OR_DIR",
                   help="the Q-Former's BERT tokenizer, saved with a stage-1 checkpoint for itm/retrieve")
    p.add_argument("--qformer-heads", type=positive_int, default=None, metavar="N",
                   help="Q-Former attention heads (default: hidden size / 64)")
    p.add_argument("--vision-heads", type=positive_int, default=None, metavar="N",
                   help="ViT attention heads (default: 16 for EVA ViT-g)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `blip2 …` with `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, usage errors
        return done.code if isinstance(done.code, int) else (0 if done.code is None else EXIT_USAGE)
    try:
        with _library_output(args.verbose, notes=args.command not in OWN_LOGGING):
            return args.func(args)
    except KeyboardInterrupt:
        print("\nblip2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # ImageError (blip2.data.images) and CheckpointError (blip2.convert.checkpoint) are ValueErrors: catching
    # ValueError takes them without importing torch here. Anything else is a bug and keeps its traceback.
    except (CliError, FileNotFoundError, PermissionError, ValueError) as err:
        if args.debug:
            raise
        print(f"blip2: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `blip2 … | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
