"""Probe: does a static key/value cache with a compiled decode step (transformers' `cache_implementation="static"`
+ `CompileConfig`, torch inductor on CPU) speed up greedy decoding, and does it keep every token?

The library's opt-in `blip2.load(..., compile_decode=True)` uses these settings; this measures them on the mid-size random model that
`bench_inference.py` caches (`runs/bench/mid-random`; run that benchmark once first). Only the LLM's generate is
timed, on a fixed soft prompt of 4 images, greedy, 20 new tokens, 1 thread: plain (dynamic cache), static cache,
static cache + compiled forward (the first compiled call, which compiles, is reported separately).

    python benchmarks/probe_compile_decode.py [--reps 3] [--out benchmarks/results/compile_probe_cpu.json]
    python benchmarks/probe_compile_decode.py --variants plain,static+compiled,static+compiled+freezing \
        --out benchmarks/results/compile_probe_cpu_freezing.json

Each call's CPU seconds are recorded too (`cpu_s`, `cpu_speedup_vs_plain`): on a shared machine they are the
numbers to read. The freezing variant (inductor's `freezing`: weights as constants, prepacked for oneDNN) is a
probe only; the library does not use it.
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
    parser.add_argument("--variants", default="plain,static,static+compiled",
                        help="comma-separated, of plain, static, static+compiled, static+compiled+freezing "
                             "(inductor's freezing: weights as constants, prepacked for oneDNN; not what the library uses)")
    args = parser.parse_args()
    if not (MID / "config.json").exists():
        raise SystemExit(f"{MID} is missing: run benchmarks/bench_inference.py once (it saves the model there)")
    torch.set_num_threads(1)
    model = blip2.load(MID).model
    torch.manual_seed(0)
    with torch.inference_mode():
        soft = model.soft_prompt(model.encode_image(torch.randn(4, 3, 224, 224)))
        ids = torch.full((4, 1), 2, dtype=torch.long)

        cpu_times: list[float] = []  # each call's CPU seconds (1 thread: the work, whatever other jobs take)

        def call(**kw) -> tuple[torch.Tensor, float]:
            start, cpu = time.perf_counter(), time.process_time()
            out = model.generate(soft_prompt=soft, input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens, num_beams=1,
                                 do_sample=False, **kw)
            cpu_times.append(time.process_time() - cpu)
            return out, time.perf_counter() - start

        compiled = CompileConfig(fullgraph=False)
        compiled._compile_all_devices = True  # transformers compiles only on accelerators unless told
        frozen = CompileConfig(fullgraph=False, mode=None, options={"freezing": True})
        frozen._compile_all_devices = True
        variants = {"plain": {}, "static": {"cache_implementation": "static"},
                    "static+compiled": {"cache_implementation": "static", "compile_config": compiled},
                    "static+compiled+freezing": {"cache_implementation": "static", "compile_config": frozen}}
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
        baseline, result = None, {}
        for name, kw in variants.items():
            first_out, first = call(**kw)  # warm-up (for the compiled variant: the compilation)
            times, outs = [], []
            first_cpu = cpu_times[-1]
            for _ in range(args.reps):
                out, seconds = call(**kw)
                times.append(seconds)
                outs.append(out)
            baseline = outs[0] if baseline is None else baseline
            same = all(torch.equal(o, baseline) for o in outs + [first_out])
            result[name] = {"first_call_s": first, "first_call_cpu_s": first_cpu, "best_s": min(times), "times_s": times,
                            "cpu_s": cpu_times[-args.reps:], "tokens_equal_plain": same}
            print(f"{name:16s} first {first:6.2f} s  best {min(times):5.2f} s  tokens equal plain: {same}", flush=True)
    for name in result:
        result[name]["speedup_vs_plain"] = result["plain"]["best_s"] / result[name]["best_s"]
        result[name]["cpu_speedup_vs_plain"] = min(result["plain"]["cpu_s"]) / min(result[name]["cpu_s"])
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.processor()
            or platform.machine(), "threads": 1, "batch": 4, "new_tokens": args.tokens}
    Path(args.out).write_text(json.dumps({"meta": meta, "variants": result}, indent=2))
    print(json.dumps({k: [round(v["speedup_vs_plain"], 3), round(v["cpu_speedup_vs_plain"], 3)] for k, v in result.items()}))


if __name__ == "__main__":
    main()
