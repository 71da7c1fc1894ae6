"""Where captioning and VQA spend their time: a per-stage profile of bench_inference.py's tasks.

On the same mid-size random model (ViT-B/14 at 224 px, 12 x 768 Q-Former, OPT-125m-sized LLM), each task's
call is split into: the vision tower, the Q-Former + projection (the soft prompt), and `generate`, which is
split again by hooks on the LLM's forward into the prefill (forwards over more than one position), the decode
steps (one position each) and what is left: generate's own per-step work (logits processors, stopping criteria, cache
bookkeeping, beam bookkeeping, input preparation). A cProfile of `generate` lists the biggest items of that
rest. Times are this process's CPU time, not wall time: with one thread that is the work done, whatever other
processes on a shared machine take. Writes a markdown table (default benchmarks/results/profile_cpu.md).

    python benchmarks/profile_inference.py            # 1 thread, 3 calls per task (median), ~2 min
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402  (the model, its tokenizer, prompts and images)

import blip2  # noqa: E402


class ForwardTimer:
    """Times every forward of one module (CPU time, between pre- and post-hook) with its number of positions:
    more than one is a prefill (generate's first forward, or a shared-prefix/kept-cache prefill), one is a
    decode step."""

    def __init__(self, module: torch.nn.Module):
        self.times: list[tuple[float, int]] = []
        self._start, self._positions = 0.0, 0
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post)

    def _pre(self, _module: object, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        self._positions = int(x.shape[1]) if x is not None else 1
        self._start = time.process_time()

    def _post(self, *_: object) -> None:
        self.times.append((time.process_time() - self._start, self._positions))


def timed(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def profile_task(
    name: str, encode: Callable[[], torch.Tensor], prompt: Callable[[torch.Tensor], torch.Tensor],
    generate: Callable[[torch.Tensor], object], timer: ForwardTimer, reps: int,
) -> dict:
    """Median over `reps` calls of each stage's seconds."""
    stages: dict[str, list[float]] = {k: [] for k in ("vision", "qformer", "prefill", "steps", "overhead", "total")}
    steps = 0
    for i in range(reps + 1):  # the first call warms up
        start = time.process_time()
        t0 = time.process_time()
        feats = encode()
        t1 = time.process_time()
        soft = prompt(feats)
        t2 = time.process_time()
        timer.times.clear()
        generate(soft)
        t3 = time.process_time()
        if i == 0:
            continue
        prefill = [t for t, n in timer.times if n > 1]
        step = [t for t, n in timer.times if n == 1]
        steps = len(step)
        stages["vision"].append(t1 - t0)
        stages["qformer"].append(t2 - t1)
        stages["prefill"].append(sum(prefill))
        stages["steps"].append(sum(step))
        stages["overhead"].append((t3 - t2) - sum(prefill) - sum(step))
        stages["total"].append(t3 - start)
    row = {k: statistics.median(v) for k, v in stages.items()}
    row["task"], row["decode_steps"] = name, steps
    print(f"  {name}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items() if isinstance(v, float)),
          flush=True)
    return row


def top_functions(fn: Callable[[], object], n: int = 12) -> str:
    """cProfile's biggest self-time entries of one call (torch ops appear under their Python callers)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default="caption,ask", help="comma-separated: caption, ask")
    p.add_argument("--dtype", default="float32", choices=sorted(bi.DTYPES))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_cpu.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count())

    folder = bi.cached_checkpoint()
    dtype = bi.DTYPES[args.dtype]
    ours = blip2.load(folder, device="cpu", dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = ours.model
    timer = ForwardTimer(model.language_model)
    pixels = ours.images(bi.images(args.batch_size)).to(dtype)
    bos = torch.full((args.batch_size, 1), tokenizer.bos_token_id)
    prompts = [bi.VQA_TEMPLATE.format(q) for q in bi.QUESTIONS]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding="longest")
    n = len(prompts)
    one = pixels[:1]

    rows, profiles = [], {}
    with torch.inference_mode():
        for beams in ((1, 5) if "caption" in args.tasks.split(",") else ()):
            gen = {**bi.fixed_length(bi.CAPTION_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
            name = f"caption, {'greedy' if beams == 1 else f'{beams} beams'}, batch {args.batch_size}, {bi.CAPTION_TOKENS} tokens"
            rows.append(profile_task(
                name, lambda: model.encode_image(pixels), model.soft_prompt,
                lambda soft, gen=gen: model.generate(soft_prompt=soft, input_ids=bos, attention_mask=torch.ones_like(bos), **gen),
                timer, args.reps,
            ))
            soft = model.soft_prompt(model.encode_image(pixels))
            profiles[name] = top_functions(lambda gen=gen: model.generate(
                soft_prompt=soft, input_ids=bos, attention_mask=torch.ones_like(bos), **gen))
        for beams in ((1, 5) if "ask" in args.tasks.split(",") else ()):
            gen = {**bi.fixed_length(bi.ANSWER_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
            if beams > 1:
                gen["length_penalty"] = -1.0
            name = f"ask, {n} questions about 1 image, {'greedy' if beams == 1 else f'{beams} beams'}, {bi.ANSWER_TOKENS} tokens"
            # What Blip2.ask does: one soft prompt, its keys/values shared by the questions and beams.
            rows_ = torch.zeros(n, dtype=torch.long)
            rows.append(profile_task(
                name, lambda: model.encode_image(one), ours.soft_prompts,
                lambda soft, gen=gen: model.lm.generate_shared(soft, rows_, enc["input_ids"], enc["attention_mask"], **gen),
                timer, args.reps,
            ))
            soft = ours.soft_prompts(model.encode_image(one))
            profiles[name] = top_functions(lambda gen=gen: model.lm.generate_shared(
                soft, rows_, enc["input_ids"], enc["attention_mask"], **gen))

    lines = [
        "# Inference profile (CPU)",
        "",
        f"`python benchmarks/profile_inference.py` on {os.cpu_count()} CPUs, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}; bench_inference.py's mid-size "
        f"random model (311M). Medians of {args.reps} calls, CPU milliseconds; `overhead` = generate's time outside the "
        "LLM's forward calls (logits processors, stopping criteria, cache and beam bookkeeping, input preparation).",
        "",
        "| task | total | vision tower | Q-Former + projection | LLM prefill | LLM 1-position forwards (n) | per step "
        "| generate overhead | overhead per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = max(r["decode_steps"], 1)
        pct = {k: 100 * r[k] / r["total"] for k in ("vision", "qformer", "prefill", "steps", "overhead")}
        lines.append(
            f"| {r['task']} | {r['total'] * 1e3:.0f} | {r['vision'] * 1e3:.0f} ({pct['vision']:.0f}%) "
            f"| {r['qformer'] * 1e3:.0f} ({pct['qformer']:.0f}%) | {r['prefill'] * 1e3:.0f} ({pct['prefill']:.0f}%) "
            f"| {r['steps'] * 1e3:.0f} ({r['decode_steps']}, {pct['steps']:.0f}%) | {r['steps'] / s * 1e3:.1f} "
            f"| {r['overhead'] * 1e3:.0f} ({pct['overhead']:.0f}%) | {r['overhead'] / (s + 1) * 1e3:.2f} |"
        )
    lines += ["", "## cProfile of `generate` (self time, top entries)", ""]
    for name, text in profiles.items():
        lines += [f"### {name}", "", "```", *[ln for ln in text.strip().splitlines()[:32]], "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 8 + len(rows)]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
