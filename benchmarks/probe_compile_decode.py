"""Probe: does a static key/value cache with a compiled decode step (transformers' `cache_implementation="static"`
+ `CompileConfig`, torch inductor on CPU) speed up greedy decoding, and does it keep every token?

The library's opt-in `blip2.load(..., compile_decode=True)` uses these settings; this measures them on the mid-size random model that
`bench_inference.py` caches (`runs/bench/mid-random`; run that benchmark once first). Only the LLM's generate is
timed, on a fixed soft prompt of 4 images, greedy, 20 new tokens, 1 thread: plain (dynamic cache), static cache,
static cache + compiled forward (the first compiled call, which compiles, is reported separately).

    python benchmarks/probe_compile_decode.py [--reps 3] [--out benchmarks/results/compile_probe_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig

import blip2

MID = Path(__file__).resolve().parent.parent / "runs" / "bench" / "mid-random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed calls per variant after one warm-up")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per call (min = max)")
    parser.add_argument("--out", default="benchmarks/results/compile_probe_cpu.json")
    args = parser.parse_args()
    if not (MID / "config.json").exists():
        raise SystemExit(f"{MID} is missing: run benchmarks/bench_inference.py once (it saves the model there)")
    torch.set_num_threads(1)
    model = blip2.load(MID).model
    torch.manual_seed(0)
    with torch.inference_mode():
        soft = model.soft_prompt(model.encode_image(torch.randn(4, 3, 224, 224)))
        ids = torch.full((4, 1), 2, dtype=torch.long)

        def call(**kw) -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            out = model.generate(soft_prompt=soft, input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=1,
                                 do_sample=False, **kw)
            return out, time.perf_counter() - start

        compiled = CompileConfig(fullgraph=False)
        compiled._compile_all_devices = True  # transformers compiles only on accelerators unless told
        variants = {"plain": {}, "static": {"cache_implementation": "static"},
                    "static+compiled": {"cache_implementation": "static", "compile_config": compiled}}
        baseline, result = None, {}
        for name, kw in variants.items():
            first_out, first = call(**kw)  # warm-up (for the compiled variant: the compilation)
            times, outs = [], []
            for _ in range(args.reps):
                out, seconds = call(**kw)
                times.append(seconds)
                outs.append(out)
            baseline = outs[0] if baseline is None else baseline
            same = all(torch.equal(o, baseline) for o in outs + [first_out])
            result[name] = {"first_call_s": first, "best_s": min(times), "times_s": times, "tokens_equal_plain": same}
            print(f"{name:16s} first {first:6.2f} s  best {min(times):5.2f} s  tokens equal plain: {same}", flush=True)
    for name in result:
        result[name]["speedup_vs_plain"] = result["plain"]["best_s"] / result[name]["best_s"]
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.processor()
            or platform.machine(), "threads": 1, "batch": 4, "new_tokens": args.tokens}
    Path(args.out).write_text(json.dumps({"meta": meta, "variants": result}, indent=2))
    print(json.dumps({k: round(v["speedup_vs_plain"], 3) for k, v in result.items()}))


if __name__ == "__main__":
    main()
