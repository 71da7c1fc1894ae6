"""Memory to load the published BLIP-2 checkpoints, ours against transformers, on the same files (issue 13).

For each published shape (blip2-opt-2.7b, blip2-opt-6.7b, blip2-flan-t5-xl, blip2-itm-vit-g; xxl where the
machine has the memory) a full-size checkpoint with random weights is written as float32 safetensors shards in
transformers' layout, as on the hub (10 GB shards, an index; every state-dict name), into a cache folder
(default ~/.cache/blip2/bench, never the repository). Then each library loads it with dtype bfloat16 in a
fresh subprocess, and we record its peak resident memory (VmHWM, the kernel's high-water mark of the child's
RSS), the load time, and the time to a first caption of one image with 5 new tokens (greedy; retrieval
models: one ITM score instead). The checkpoint is deleted before the next one is written (--keep keeps it).

Memory safety (the machine is shared): before each child the script checks MemAvailable and skips a child
that cannot fit; while it runs, a watchdog polls MemAvailable every 0.1 s and kills the child when it drops
under --floor-gib, recording "stopped at X GiB" instead of letting the machine swap or the OOM killer pick.

    python benchmarks/bench_memory.py                          # all shapes that fit this machine
    python benchmarks/bench_memory.py --models blip2-opt-2.7b   # one
    python benchmarks/bench_memory.py --table                   # re-print the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARD_BYTES = 10 * 10**9  # the hub's BLIP-2 repos were written with transformers' 10 GB shards
NEW_TOKENS = 5
LIBS = ["ours", "ours-1", "ours-3", "transformers"]  # ours-N: ours with N reader threads (loading.READ_THREADS)

# Published shapes (the hub configs of Salesforce/blip2-*): ViT-g/14 and the 12-layer Q-Former are
# transformers' Blip2VisionConfig / Blip2QFormerConfig defaults; the LLMs are OPT-2.7b/6.7b and Flan-T5-XL/XXL.
OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, num_attention_heads=32,
           num_hidden_layers=32, word_embed_proj_dim=None, do_layer_norm_before=True, bos_token_id=2,
           eos_token_id=2, pad_token_id=1, activation_function="relu", enable_bias=True)
T5 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
          is_gated_act=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0,
          decoder_start_token_id=0, relative_attention_num_buckets=32)
MODELS = {
    "blip2-opt-2.7b": dict(text={**OPT, "hidden_size": 2560, "ffn_dim": 10240, "word_embed_proj_dim": 2560},
                           image_token=50265, tokenizer="opt"),
    "blip2-itm-vit-g": dict(text=None, image_token=None, tokenizer="bert"),
    "blip2-flan-t5-xl": dict(text={**T5, "d_model": 2048, "d_ff": 5120, "num_heads": 32, "num_layers": 24,
                                   "num_decoder_layers": 24}, image_token=32100, tokenizer="t5"),
    "blip2-opt-6.7b": dict(text={**OPT, "hidden_size": 4096, "ffn_dim": 16384, "word_embed_proj_dim": 4096},
                           image_token=50265, tokenizer="opt"),
    "blip2-flan-t5-xxl": dict(text={**T5, "d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24,
                                    "num_decoder_layers": 24}, image_token=32100, tokenizer="t5"),
}
DEFAULT_MODELS = ["blip2-opt-2.7b", "blip2-itm-vit-g", "blip2-flan-t5-xl", "blip2-opt-6.7b", "blip2-flan-t5-xxl"]


# -- the checkpoint ----------------------------------------------------------------------------------------
def hf_model_on_meta(name: str):
    """transformers' model of this shape, without memory: its state-dict keys, shapes and tied weights."""
    from accelerate import init_empty_weights
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    spec = MODELS[name]
    if spec["text"] is None:
        cfg = Blip2Config(qformer_config={"use_qformer_text_input": True}, num_query_tokens=32,
                          image_text_hidden_size=256)
        cls = Blip2ForImageTextRetrieval
    else:
        cfg = Blip2Config(text_config=dict(spec["text"]), num_query_tokens=32, image_token_index=spec["image_token"])
        cls = Blip2ForConditionalGeneration
    cfg.architectures = [cls.__name__]
    with init_empty_weights():
        model = cls(cfg)
    return model, cfg


def stored_tensors(model) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every state-dict tensor, shared objects once. On a model built on meta the tied
    embeddings are separate objects, so they are written under each of their names."""
    seen: set[int] = set()
    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((key, tuple(t.shape)))
    return out


POOL = 1 << 22  # random values drawn once; tensors are windows of it at random offsets


def _pool(gen):
    """N(0, 0.02) values, twice over so any window of POOL values is contiguous: drawing 3.9B fresh normals
    takes minutes on a busy 2-core machine, windows of one pool cost only the disk write."""
    import torch

    pool = torch.randn(POOL, generator=gen).mul_(0.02)
    return memoryview(torch.cat([pool, pool]).numpy()).cast("B")


def _write_values(fh, key: str, n: int, pool: memoryview, gen) -> None:
    """Zero biases, unit norm gains, and random windows of the pool for every other tensor: a forward stays
    finite, so the first caption runs the same work as with trained weights."""
    import torch

    low = key.lower()
    if low.endswith("bias") or ("norm" in low and low.endswith("weight")):
        value = struct.pack("<f", 0.0 if low.endswith("bias") else 1.0)
        block = value * min(n, 1 << 20)
        for start in range(0, n, 1 << 20):
            fh.write(block[: 4 * min(1 << 20, n - start)])
        return
    for start in range(0, n, POOL):
        k = min(POOL, n - start)
        offset = int(torch.randint(POOL, (1,), generator=gen))
        fh.write(pool[4 * offset : 4 * (offset + k)])


def write_checkpoint(name: str, folder: Path, seed: int = 0) -> dict:
    """float32 safetensors shards + index + config + tokenizer + preprocessor, streamed: one chunk in memory."""
    import torch

    model, cfg = hf_model_on_meta(name)
    tensors = stored_tensors(model)
    del model
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in tensors:
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    pool = _pool(gen)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in shard:
            nbytes = 4 * math.prod(shape)
            header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        with open(folder / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for key, shape in shard:
                _write_values(fh, key, math.prod(shape), pool, gen)
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(folder)
    _write_tokenizer(MODELS[name]["tokenizer"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "size": {"height": 224, "width": 224}, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return {"tensors": tensors, "bytes": total}


def _write_tokenizer(kind: str, folder: Path) -> None:
    """A word-level tokenizer (no download): loading and the first caption do not depend on its words."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import word_tokenizer

    word_tokenizer(kind).save_pretrained(folder)


def sizes(tensors: list[tuple[str, tuple[int, ...]]]) -> dict:
    """Parameter counts and bytes per dtype. int8/int4: bitsandbytes quantizes the LLM's Linear weights
    (not its embeddings, lm_head or T5's relative position tables); everything else stays 16-bit."""
    total = sum(math.prod(s) for _, s in tensors)
    llm = sum(math.prod(s) for k, s in tensors if k.startswith("language_model."))
    quant = sum(math.prod(s) for k, s in tensors
                if k.startswith("language_model.") and len(s) == 2 and k.endswith(".weight")
                and not any(w in k for w in ("embed", "lm_head", "shared", "relative_attention_bias")))
    rest = total - quant
    return {"params": total, "llm_params": llm, "fp32_gib": 4 * total / GIB, "bf16_gib": 2 * total / GIB,
            "int8_gib": (quant + 2 * rest) / GIB, "int4_gib": (0.5 * quant + 2 * rest) / GIB}


# -- one measured load, in its own process -------------------------------------------------------------------
def _hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Load with one library, then one caption (or ITM score); print JSON."""
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    retrieval = args.kind == "itm"
    image = Image.fromarray(((torch.rand(320, 400, 3, generator=torch.Generator().manual_seed(0)) * 255)
                             .to(torch.uint8)).numpy())
    if args.lib.startswith("ours"):
        import blip2  # imports before the clock: load time is the loading alone
        import blip2.inference.pipeline  # noqa: F401
        from blip2.convert import loading

        if args.lib != "ours":  # the same loader with another number of reader threads
            loading.READ_THREADS = int(args.lib.split("-")[1])
    else:
        from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, BlipImageProcessorPil
    start = time.perf_counter()
    if args.lib.startswith("ours"):
        model = blip2.load(folder, device="cpu", dtype="bfloat16")
        loaded = time.perf_counter()
        peak_load = _hwm_gib()
        if args.load_only:
            out = None
        elif retrieval:
            out = model.itm(image, "a photo of a cat")
        else:
            out = model.caption(image, num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    else:
        cls = Blip2ForImageTextRetrieval if retrieval else Blip2ForConditionalGeneration
        model = cls.from_pretrained(folder, dtype=torch.bfloat16).eval()
        loaded = time.perf_counter()
        peak_load = _hwm_gib()
        if args.load_only:
            print(json.dumps({"load_s": loaded - start, "peak_load_gib": peak_load}), flush=True)
            return
        pixels = BlipImageProcessorPil.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(torch.bfloat16)
        with torch.no_grad():
            if retrieval:
                from transformers import AutoTokenizer

                text = AutoTokenizer.from_pretrained(folder)("a photo of a cat", return_tensors="pt")
                logits = model(pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                               use_image_text_matching_head=True).logits_per_image
                out = torch.softmax(logits.float(), dim=1)[:, 1].tolist()
            else:
                cfg = model.config
                ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]])
                out = model.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False).tolist()
    first = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "first_s": first - loaded, "peak_load_gib": peak_load,
                      "peak_gib": _hwm_gib(), "output": str(out)[:200]}), flush=True)


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def _rss_gib(pid: int, field: str = "VmRSS") -> float:
    """VmRSS, or RssAnon: the part that is not file pages (transformers memory-maps the shards, and mapped
    pages count as resident but the kernel can drop them under pressure)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def _drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the shards' cached pages so each library reads from disk alike."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(lib: str, folder: Path, kind: str, need_gib: float, floor_gib: float, threads: int, timeout: float,
            load_only: bool = False) -> dict:
    available = _mem_available_gib()
    if available - need_gib < floor_gib:
        return {"status": f"not run: {available:.1f} GiB available, the model alone needs {need_gib:.1f} GiB"}
    _drop_page_cache(folder)
    cmd = [sys.executable, __file__, "--child", lib, "--folder", str(folder), "--kind", kind, "--threads", str(threads)]
    cmd += ["--load-only"] if load_only else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    peak_rss, peak_anon, lowest_available, stopped = 0.0, 0.0, available, None
    start = time.perf_counter()
    while proc.poll() is None:
        peak_rss = max(peak_rss, _rss_gib(proc.pid))
        peak_anon = max(peak_anon, _rss_gib(proc.pid, "RssAnon"))
        free = _mem_available_gib()
        lowest_available = min(lowest_available, free)
        if free < floor_gib:
            stopped = f"stopped at {peak_rss:.1f} GiB (over this machine's memory: {free:.1f} GiB left)"
        elif time.perf_counter() - start > timeout:
            stopped = f"stopped after {timeout:.0f} s at {peak_rss:.1f} GiB"
        if stopped:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    row = {"status": stopped or ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"),
           "peak_rss_polled_gib": peak_rss, "peak_anon_polled_gib": peak_anon, "available_before_gib": available, "lowest_available_gib": lowest_available}
    if proc.returncode == 0 and not stopped:
        row.update(json.loads(out.strip().splitlines()[-1]))
    elif not stopped:
        row["error"] = err.strip().splitlines()[-3:]
    return row


# -- the run and the table -------------------------------------------------------------------------------------
def machine() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / GIB, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def bar_gib(s: dict) -> float:
    return 1.25 * s["bf16_gib"] + 0.5


def run(args: argparse.Namespace) -> dict:
    out_json = RESULTS / f"{args.out}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() and args.resume else {"models": {}}
    results["machine"] = machine()
    results["settings"] = {"dtype": "bfloat16", "threads": args.threads, "new_tokens": NEW_TOKENS,
                           "floor_gib": args.floor_gib, "shard_bytes": SHARD_BYTES}
    for name in args.models:
        model, _ = hf_model_on_meta(name)
        s = sizes(stored_tensors(model))
        del model
        row = results["models"].setdefault(name, {})
        row["sizes"] = s
        folder = args.cache / name
        # Ours needs about the bf16 model; skip shapes that cannot load here at all (xxl: 12.2B parameters).
        need = s["bf16_gib"] + 0.5
        if need > _mem_available_gib() - args.floor_gib:
            row["note"] = (f"not run: needs ~{need:.1f} GiB in bf16 and this machine has "
                           f"{_mem_available_gib():.1f} GiB available")
            print(name, row["note"], flush=True)
            continue
        disk_free = shutil.disk_usage(args.cache).free / GIB if args.cache.exists() else shutil.disk_usage(Path.home()).free / GIB
        if s["fp32_gib"] > disk_free - 5 and not (folder / "config.json").exists():
            row["note"] = f"not run: {s['fp32_gib']:.0f} GiB of fp32 shards, {disk_free:.0f} GiB of disk free"
            print(name, row["note"], flush=True)
            continue
        if not (folder / "config.json").exists():
            t = time.perf_counter()
            write_checkpoint(name, folder)
            (folder / "generated.json").write_text(json.dumps({"generate_s": time.perf_counter() - t}))
        row.update(json.loads((folder / "generated.json").read_text()))  # --keep: written by an earlier run
        print(f"{name}: {s['fp32_gib']:.1f} GiB of fp32 shards written in {row['generate_s']:.0f} s", flush=True)
        kind = "itm" if MODELS[name]["text"] is None else "gen"
        row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for lib in LIBS:  # a row holds one run's numbers only
            row.pop(lib, None)
        for lib in args.libs:
            row[lib] = measure(lib, folder, kind, s["bf16_gib"], args.floor_gib, args.threads, args.timeout)
            print(name, lib, json.dumps(row[lib]), flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=2))
        # More loads, the libraries interleaved, so a busy moment of the shared machine hits them alike: the
        # table shows each library's fastest load (all of them are in the JSON, load_runs_s).
        for _ in range(args.repeat - 1):
            for lib in args.libs:
                if row[lib].get("status") != "ok":
                    continue
                again = measure(lib, folder, kind, s["bf16_gib"], args.floor_gib, args.threads, args.timeout, True)
                runs = row[lib].setdefault("load_runs_s", [row[lib]["load_s"]])
                if again.get("status") == "ok":
                    runs.append(again["load_s"])
                    row[lib]["load_s"] = min(runs)
                print(name, lib, "load again:", json.dumps(again), flush=True)
                out_json.write_text(json.dumps(results, indent=2))
        if not args.keep:
            shutil.rmtree(folder)
    out_json.write_text(json.dumps(results, indent=2))
    return results


def _cell(r: dict | None, key: str, fmt: str) -> str:
    if not r:
        return "–"
    if r.get("status") != "ok":
        # a skipped shape says why once (in the peak column); a stopped child shows where it stopped
        shown = key == "peak_load_gib" or not r.get("status", "").startswith("not run")
        return r.get("status", "–").split(" (")[0] if shown else "–"
    return fmt.format(r[key])


def _anon(r: dict | None) -> str:
    """The polled peak of anonymous memory, where measured: what the kernel cannot drop under pressure
    (memory-mapped shard pages count in VmHWM but are page cache)."""
    if not r or r.get("status") != "ok" or "peak_anon_polled_gib" not in r:
        return ""
    return f" ({r['peak_anon_polled_gib']:.1f} anon)"


def _readers(row: dict) -> str:
    """Ours again with N reader threads, in the same run: what the reader threads buy (or cost) here."""
    runs = [(lib.split("-")[1], row[lib]) for lib in LIBS if lib.startswith("ours-") and row.get(lib)]
    return "".join(f" ({n} reader{'s' * (n != '1')}: {r['load_s']:.1f} s)" for n, r in runs if r.get("status") == "ok")


def table(results: dict) -> str:
    lines = [
        "| checkpoint | parameters | fp32 | bf16 | int8 | int4 | bar (1.25 × bf16 + 0.5) | peak RSS to load: ours | "
        "transformers | load: ours | transformers | first caption: ours | transformers | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        s = row["sizes"]
        ours, hf = row.get("ours"), row.get("transformers")
        if "note" in row and not ours:
            ours, hf = {"status": row["note"]}, {"status": "–"}
        mark = ""
        if ours and ours.get("status") == "ok":
            mark = " ✓" if ours["peak_load_gib"] <= bar_gib(s) else " ✗"
        lines.append(
            f"| {name} | {s['params'] / 1e9:.2f} B | {s['fp32_gib']:.1f} GiB | {s['bf16_gib']:.1f} GiB | "
            f"{s['int8_gib']:.1f} GiB | {s['int4_gib']:.1f} GiB | {bar_gib(s):.1f} GiB | "
            f"{_cell(ours, 'peak_load_gib', '{:.1f} GiB')}{mark}{_anon(ours)} | "
            f"{_cell(hf, 'peak_load_gib', '{:.1f} GiB')}{_anon(hf)} | "
            f"{_cell(ours, 'load_s', '{:.1f} s')}{_readers(row)} | {_cell(hf, 'load_s', '{:.1f} s')} | "
            f"{_cell(ours, 'first_s', '{:.0f} s')} | {_cell(hf, 'first_s', '{:.0f} s')} | {row.get('measured', 'an earlier run (2f49aa7)')} |"
        )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The results file: machine, method, table."""
    m = results["machine"]
    md = [f"# Memory to load BLIP-2 checkpoints in bfloat16: ours vs transformers {m['transformers']}", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_total_gib']} GiB (shared with other jobs), torch "
          f"{m['torch']}, {results['settings']['threads']} threads. Random-weight float32 shards with the published "
          "shapes (10 GB shards, as on the hub), loaded with dtype bfloat16 in a fresh process per library. Peak RSS = "
          "the child's VmHWM after loading; in brackets its anonymous memory (RssAnon) sampled every 0.1 s "
          "(transformers memory-maps the shards: mapped pages count as resident but are droppable page cache). "
          "Load: ours with loading.READ_THREADS reader threads; in brackets ours with N readers, same run; "
          "where a row was run with --repeat, the fastest of its interleaved loads (all in the JSON: load_runs_s). "
          "Sizes per dtype are computed from the parameter counts (int8/int4: "
          "the LLM's Linear weights quantized, the rest 16-bit). First caption: one 400×320 image, "
          f"{NEW_TOKENS} new tokens, greedy (retrieval: one ITM score). \"stopped\": the watchdog killed the "
          f"child when MemAvailable fell under {results['settings']['floor_gib']} GiB. Each row comes from one run "
          "(all libraries in it, minutes apart on a shared machine, whose load changes the times by up to 2x); "
          "\"measured\" says when.", "", table(results), ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--libs", nargs="+", default=["ours", "ours-1", "transformers"], choices=LIBS,
                   help="ours-N: ours with N reader threads instead of loading.READ_THREADS (this machine's)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2"))
                   / "bench")
    p.add_argument("--keep", action="store_true", help="keep each generated checkpoint (default: delete it)")
    p.add_argument("--resume", action="store_true", help="add to the existing JSON instead of starting afresh")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--floor-gib", type=float, default=1.5, help="kill a child when MemAvailable drops under this")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child")
    p.add_argument("--out", default="memory_cpu")
    p.add_argument("--table", action="store_true", help="print the table of the existing JSON and exit")
    p.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="gen", help=argparse.SUPPRESS)
    p.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="load each library this many times, interleaved; the "
                   "table shows the fastest (the first caption is timed once)")
    args = p.parse_args(argv)
    if args.child:
        args.lib = args.child
        child(args)
        return 0
    if args.table:  # the table again from the JSON, and the .md rewritten from it
        results = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(results))
        print(table(results))
        return 0
    results = run(args)
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
