"""`blip2 serve` under concurrent clients, with batching on and off, in the same run.

For each model (`default`, the bundled one; `mid`, bench_inference.py's random-weight 311M model, built once
and cached) the script starts `blip2 serve` as its own process on 127.0.0.1 once per configuration: `off`
(`--max-batch-size 1 --no-continuous-batching`: one request at a time, end to end), `on` (the server's
default: continuous batching, `--max-batch-size 16`) and, if asked for, `whole` (`--no-continuous-batching`:
whole `generate` batches of up to 16). Each server gets a warm-up, then a concurrency sweep: at each level c,
c client workers (asyncio + httpx, one process, closed loop: a worker sends its next request when its last
one ends) share N requests (default max(32, 4c)).

Every request is a streamed `POST /v1/chat/completions`: one user message with one image (a 400 x 320 JPEG
data URL) and one question, greedy, a fixed `max_tokens` (20), the server's default VQA template. Request i
asks question (i + i // 16) % 8 about image i % 16, so a level's requests are distinct image-question pairs.
Each level uses 16 images new to the server: the first request of each image encodes it, the others hit the
image cache (16 encodes in N requests).

Per level: requests/s and images/s (successful requests per second; every request carries exactly one image,
so the two are equal here; `encoded` counts the images the server had to encode), generated tokens/s, time to
first token (TTFT: request sent -> first non-empty content delta) and end-to-end latency (-> `[DONE]`) at
p50/p95/p99, errors, the batch sizes and image encodes (from the server's /metrics) and the server's CPU use.
Then, per level, each configuration's throughput over off's, and its p95 latency over a lone request's (the
median latency at c = 1, off). Every server gets the same requests at each level and their answers are
compared with off's; at c = 1 they must be identical (the script exits 1 on a mismatch).

    python benchmarks/bench_serve.py            # both models, c = 1..32, 1 server thread
    python benchmarks/bench_serve.py --quick    # smoke run: c = 1, 4, 16, max(8, c) requests
    python benchmarks/bench_serve.py --configs off,on,whole   # continuous and whole-batch batching

`--prefix-chat` measures the prefix cache across requests instead (benchmarks/results/serve_cpu_prefix.*): per
model, two servers up at once, the default (`--prefix-cache-mb 256`) and `--prefix-cache-mb 0`; one client
holds `--chat-repeats` 10-turn conversations on each (one image each, greedy, streamed, max_tokens 20; the
servers take turns, turn by turn), resending the whole conversation each turn as chat completions clients do.
Only `mid` by default: the default model's Q-Former reads the question, so its soft prompt changes every
turn and the server keeps no prefix for it. Per turn: the median latency and
TTFT over the conversations, with the cache and without, and their ratio; the answers of the two servers must
be identical (the script exits 1 otherwise).

    python benchmarks/bench_serve.py --prefix-chat             # the mid model, 3 conversations of 10 turns
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference as bi  # noqa: E402  (the mid-size model's builder, its questions and image generator)

READY = re.compile(r"blip2 serve: .* on (http://\S+)")
IMAGES_PER_LEVEL = 16
# The default model was trained on easy-VQA (shapes and colours); the mid model's word tokenizer knows
# bench_inference's questions.
QUESTIONS = {
    "default": ["what shape is this?", "what color is the shape?", "is there a circle?", "is the shape red?",
                "what color is it?", "is this a triangle?", "is there a blue shape?",
                "what is in the image?"],
    "mid": bi.QUESTIONS,
}
REQUEST_TIMEOUT_S = 600  # server and client: a slow level shows as latency, not as 504s


# --------------------------------------------------------------------------------------------------- models


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def requests_for(model: str, c: int, n: int, max_tokens: int) -> list[tuple[str, dict]]:
    """N (pair label, request body) for level c: 16 images of their own (seeded by c), 8 questions."""
    urls = [data_url(im) for im in bi.images(IMAGES_PER_LEVEL, seed=1000 + c)]
    qs = QUESTIONS[model]
    out = []
    for i in range(n):
        img, q = i % IMAGES_PER_LEVEL, (i + i // IMAGES_PER_LEVEL) % len(qs)
        out.append((f"{img}:{q}", {
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": urls[img]}}, {"type": "text", "text": qs[q]}]}],
            "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }))
    return out


# --------------------------------------------------------------------------------------------------- server


class Server:
    """`python -m blip2.cli serve --port 0 ...` with its URL read from the first stdout line."""

    def __init__(self, model: str, extra: list[str], threads: int, timeout: float = 600.0):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if threads:  # torch reads these at start-up; the server has no thread flag
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", model, "--port", "0",
               "--log-level", "warning", "--request-timeout", str(REQUEST_TIMEOUT_S), *extra]
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        def read_stdout() -> None:
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read_stdout, daemon=True).start()
        self.url = None
        deadline = time.monotonic() + timeout
        while self.url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if m := READY.search(line):
                self.url = m.group(1)
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.stderr[-40:]))
        self.start_s = time.perf_counter() - start

    def cpu_seconds(self) -> float | None:
        """The server process's user + system CPU time (Linux /proc), None elsewhere."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def metrics(self, want: tuple[str, ...] = ("blip2_batch_size", "blip2_image_cache_misses_total")
                ) -> dict[str, float]:
        """The /metrics samples whose names start with one of `want`."""
        text = httpx.get(self.url + "/metrics", trust_env=False).text
        return {k: float(v) for k, v in (ln.split() for ln in text.splitlines() if ln.startswith(want))}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------------------------------- client


@dataclass
class Sample:
    pair: str  # "image:question"
    ok: bool
    latency_s: float
    ttft_s: float | None = None  # None: failed, or no content at all
    text: str = ""
    tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, pair: str, body: dict) -> Sample:
    start = time.perf_counter()
    ttft, text, tokens = None, [], 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                error = f"HTTP {r.status_code}: {r.text[:200]}"
                return Sample(pair, False, time.perf_counter() - start, error=error)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]["message"][:200]
                    return Sample(pair, False, time.perf_counter() - start, error=error)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if content := choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        text.append(content)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
        return Sample(pair, False, time.perf_counter() - start, error=f"{type(err).__name__}: {err}"[:200])
    return Sample(pair, True, time.perf_counter() - start, ttft, "".join(text), tokens)


async def drive(url: str, requests: list[tuple[str, dict]], concurrency: int) -> tuple[list[Sample], float]:
    """`concurrency` closed-loop workers share the requests; (samples in request order, wall seconds)."""
    out: list[Sample | None] = [None] * len(requests)
    todo = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S + 30, trust_env=False) as client:
        async def worker() -> None:
            for i in todo:  # one shared iterator: each index goes to exactly one worker
                out[i] = await one_request(client, url, *requests[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out, time.perf_counter() - start


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def level(server: Server, model: str, c: int, n: int, max_tokens: int) -> dict:
    reqs = requests_for(model, c, n, max_tokens)
    m0, cpu0 = server.metrics(), server.cpu_seconds()
    samples, wall = asyncio.run(drive(server.url, reqs, c))
    m1, cpu1 = server.metrics(), server.cpu_seconds()
    ok = [s for s in samples if s.ok]
    lat, ttft = [s.latency_s for s in ok], [s.ttft_s for s in ok if s.ttft_s is not None]
    batches = m1["blip2_batch_size_count"] - m0["blip2_batch_size_count"]
    delta = {k: m1[k] - m0.get(k, 0) for k in m1}
    row = {
        "concurrency": c, "requests": n, "wall_s": wall, "errors": n - len(ok),
        "requests_per_s": len(ok) / wall, "images_per_s": len(ok) / wall,
        "tokens_per_s": sum(s.tokens for s in ok) / wall,
        "mean_tokens": float(np.mean([s.tokens for s in ok])) if ok else 0.0,
        **{f"ttft_p{q}_s": pct(ttft, q) for q in (50, 95, 99)},
        **{f"latency_p{q}_s": pct(lat, q) for q in (50, 95, 99)},
        "no_content": len(ok) - len(ttft),
        "mean_batch": delta["blip2_batch_size_sum"] / batches if batches else None,
        # Prometheus buckets, cumulative: batches of at most 1, 2, 4, ... requests.
        "batches_up_to": {k.split('"')[1]: int(v) for k, v in delta.items()
                          if k.startswith("blip2_batch_size_bucket")},
        "encoded": int(delta["blip2_image_cache_misses_total"]),
        "server_cores_busy": (cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else None,
        "error_messages": sorted({s.error for s in samples if s.error})[:5],
        "samples": [asdict(s) for s in samples],
    }
    print(f"    c={c:>2}: {row['requests_per_s']:.2f} req/s, latency p50 {row['latency_p50_s']:.2f}s "
          f"p95 {row['latency_p95_s']:.2f}s, TTFT p50 {row['ttft_p50_s'] or 0:.2f}s, errors {row['errors']}, "
          f"mean group {row['mean_batch'] or 0:.1f}, server cores busy {row['server_cores_busy'] or 0:.2f}",
          flush=True)
    return row


# ----------------------------------------------------------------------------------- prefix cache (chat)

CHAT_TURNS = 10
CHAT_QUESTIONS = {  # 10 turns per conversation: each model's 8 questions, then two of them again
    "default": QUESTIONS["default"] + QUESTIONS["default"][:2],
    "mid": QUESTIONS["mid"] + QUESTIONS["mid"][:2],
}


def conversations(servers: dict[str, Server], model: str, image, max_tokens: int) -> dict[str, list[Sample]]:
    """One client's 10-turn chat about one image on each server, the whole conversation resent each turn
    (streamed). The servers take turns, turn by turn, so a load change on the machine hits both alike."""
    url = data_url(image)
    messages: dict[str, list[dict]] = {name: [] for name in servers}
    out: dict[str, list[Sample]] = {name: [] for name in servers}
    for turn, question in enumerate(CHAT_QUESTIONS[model][:CHAT_TURNS]):
        text = [{"type": "text", "text": question}]
        for name, server in servers.items():
            messages[name].append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                               *text] if turn == 0 else text})
            body = {"messages": messages[name], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            sample = asyncio.run(drive(server.url, [(f"turn{turn + 1}", body)], 1))[0][0]
            if not sample.ok:
                raise RuntimeError(f"{name}: turn {turn + 1} failed: {sample.error}")
            out[name].append(sample)
            messages[name].append({"role": "assistant", "content": sample.text})
    return out


def prefix_chat(model: str, path: str, args: argparse.Namespace) -> dict:
    """The same conversations on a server with the prefix cache and on one without (see the docstring)."""
    images = bi.images(args.chat_repeats + 1, seed=77)
    configs = {"cached": ["--prefix-cache-mb", "256"], "uncached": ["--prefix-cache-mb", "0"]}
    servers: dict[str, Server] = {}
    try:
        for name, flags in configs.items():
            extra = ["--device", args.device, "--dtype", args.dtype, "--max-wait-ms", str(args.max_wait_ms), *flags]
            servers[name] = Server(path, extra, args.threads)
            print(f"  {name} ({' '.join(flags)}): server up in {servers[name].start_s:.1f}s", flush=True)
        conversations(servers, model, images[-1], args.max_tokens)  # warm-up, on an image of its own
        before = {name: server.metrics(("blip2_prefix_cache_",)) for name, server in servers.items()}
        chats = [conversations(servers, model, im, args.max_tokens) for im in images[:-1]]
        after = {name: server.metrics(("blip2_prefix_cache_",)) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    runs = {}
    for name, flags in configs.items():
        mine = [c[name] for c in chats]
        turns = [{"turn": t + 1,
                  "latency_s": float(np.median([c[t].latency_s for c in mine])),
                  "ttft_s": float(np.median([c[t].ttft_s for c in mine if c[t].ttft_s is not None] or [np.nan])),
                  "completion_tokens": [c[t].tokens for c in mine]} for t in range(CHAT_TURNS)]
        runs[name] = {"flags": flags, "turns": turns, "texts": [[s.text for s in c] for c in mine],
                      "prefix_cache": {k: after[name][k] - before[name].get(k, 0) for k in after[name]}}
        print(f"    {name}: " + ", ".join(f"turn {r['turn']}: {r['latency_s']:.2f}s" for r in turns
                                         if r["turn"] in (1, 5, 10)), flush=True)
    # A turn's answers are comparable while the two conversations are the same so far: once one answer
    # differs, every later prompt differs too. Count the comparable turns and the first divergences.
    compared, diverged = 0, []
    for c, (ca, cb) in enumerate(zip(runs["cached"]["texts"], runs["uncached"]["texts"])):
        for t, (a, b) in enumerate(zip(ca, cb)):
            compared += 1
            if a != b:
                token = next((i for i, (x, y) in enumerate(zip(a.split(), b.split())) if x != y), None)
                diverged.append({"conversation": c, "turn": t + 1, "first_differing_word": token})
                break
    return {**runs, "mismatches": len(diverged), "compared": compared, "diverged": diverged,
            "answers": CHAT_TURNS * args.chat_repeats}


def prefix_markdown(results: dict, machine: dict, args: argparse.Namespace, total: float) -> str:
    lines = [f"{machine['cpu_count']} CPUs ({machine['processor']}), server torch threads "
             f"{machine['server_threads']}, torch {machine['torch']}, transformers {machine['transformers']}, "
             f"{args.device} {args.dtype}; {args.chat_repeats} conversations of {CHAT_TURNS} turns per server, "
             f"one client, the whole conversation resent each turn (streamed chat completions, greedy, "
             f"max_tokens {args.max_tokens}); medians over the conversations; {total / 60:.1f} min in all", "",
             "| model | turn | latency s, prefix cache | latency s, none | none / cache | TTFT s, cache "
             "| TTFT s, none | none / cache |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for model, res in results.items():
        for a, b in zip(res["cached"]["turns"], res["uncached"]["turns"]):
            if a["turn"] in (1, 2, 5, 10):
                lines.append(f"| {model} | {a['turn']} | {a['latency_s']:.3f} | {b['latency_s']:.3f} "
                             f"| {b['latency_s'] / a['latency_s']:.2f} | {a['ttft_s']:.3f} | {b['ttft_s']:.3f} "
                             f"| {b['ttft_s'] / a['ttft_s']:.2f} |")
        first, last = res["cached"]["turns"][0], res["cached"]["turns"][-1]
        pc = res["cached"]["prefix_cache"]
        notes.append(f"{model}: turn 10 / turn 1 latency {last['latency_s'] / first['latency_s']:.2f} with the "
                     f"cache, {res['uncached']['turns'][-1]['latency_s'] / res['uncached']['turns'][0]['latency_s']:.2f}"
                     f" without; cache hits {pc.get('blip2_prefix_cache_hits_total', 0):g}, misses "
                     f"{pc.get('blip2_prefix_cache_misses_total', 0):g}, positions reused "
                     f"{pc.get('blip2_prefix_cache_reused_tokens_total', 0):g}; answers differing between the "
                     f"servers: {res['mismatches']} of {res['compared']} given the same conversation so far"
                     + "".join(f" (conversation {d['conversation'] + 1} at turn {d['turn']}, word "
                               f"{d['first_differing_word']}; its later turns are not comparable)" for d in res["diverged"]))
    return "\n".join(lines + ["", *(f"- {n}" for n in notes)])


def per_level(c: int, args: argparse.Namespace) -> int:
    return args.requests or (max(8, c) if args.quick else max(32, 4 * c))


def server_flags(config: str, args: argparse.Namespace) -> list[str]:
    """Batching flags of each server configuration. `off` turns continuous batching off too: with it on,
    `--max-batch-size 1` still decodes one row at a time but runs the vision tower and Q-Former once for all
    the requests that arrived together."""
    batch = str(args.max_batch_size)
    return {"off": ["--max-batch-size", "1", "--no-continuous-batching"],
            "on": ["--max-batch-size", batch, "--continuous-batching"],
            "whole": ["--max-batch-size", batch, "--no-continuous-batching"]}[config]


def run_config(model: str, path: str, config: str, args: argparse.Namespace) -> dict:
    flags = server_flags(config, args)
    extra = ["--device", args.device, "--dtype", args.dtype, "--max-wait-ms", str(args.max_wait_ms), *flags]
    server = Server(path, extra, args.threads)
    print(f"  {config} ({' '.join(flags)}): server up in {server.start_s:.1f}s at {server.url}", flush=True)
    try:
        # Warm-up on images of its own: one lone request, then one burst (a few batch shapes).
        warm = requests_for(model, 0, max(2, min(args.concurrency[-1], 8)), args.max_tokens)
        asyncio.run(drive(server.url, warm[:1], 1))
        asyncio.run(drive(server.url, warm[1:], len(warm) - 1))
        levels = [level(server, model, c, per_level(c, args), args.max_tokens) for c in args.concurrency]
    finally:
        server.stop()
    return {"flags": flags, "server_start_s": server.start_s, "levels": levels}


def compare(model: str, config: str, off: dict, on: dict) -> list[dict]:
    """Per level: on / off throughput, on's p95 over the lone request (c = 1, off), answers that differ."""
    lone = next((r["latency_p50_s"] for r in off["levels"] if r["concurrency"] == 1), None)
    rows = []
    for a, b in zip(off["levels"], on["levels"]):
        texts = {s["pair"]: s["text"] for s in a["samples"] if s["ok"]}
        both = [s for s in b["samples"] if s["ok"] and s["pair"] in texts]
        rows.append({
            "model": model, "batching": config, "concurrency": a["concurrency"],
            "off_requests_per_s": a["requests_per_s"], "on_requests_per_s": b["requests_per_s"],
            "throughput_ratio": b["requests_per_s"] / a["requests_per_s"] if a["requests_per_s"] else None,
            "lone_latency_s": lone, "on_latency_p95_s": b["latency_p95_s"],
            "off_latency_p95_s": a["latency_p95_s"],
            "on_p95_over_lone": b["latency_p95_s"] / lone if lone and b["latency_p95_s"] else None,
            "compared": len(both), "mismatches": sum(s["text"] != texts[s["pair"]] for s in both),
        })
    return rows


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default,mid",
                   help="comma-separated: default, mid (default: %(default)s)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="client levels (default: %(default)s)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(32, 4 x concurrency); --quick: max(8, c))")
    p.add_argument("--max-tokens", type=int, default=20,
                   help="max_tokens of every request (default: %(default)s)")
    p.add_argument("--configs", default="off,on",
                   help="server configurations, off first: off (--max-batch-size 1 "
                        "--no-continuous-batching), on (the server's default: continuous batching), whole "
                        "(--no-continuous-batching: whole generate batches) (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="on and whole servers' (default: %(default)s, the server's default)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="every server's (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the server (OMP_NUM_THREADS); 0 = torch's default (all cores). "
                        "1 by default: the clients run on the same machine and need a core")
    p.add_argument("--model-cache", type=Path, default=bi.MID_CACHE,
                   help="where the mid-size random model is saved once (default: runs/bench/mid-random)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: concurrency 1,4,16, max(8, c) requests per level")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results; the markdown table goes next to it (.md) (default: results/serve_cpu.json; "
                        "--prefix-chat: results/serve_cpu_prefix.json)")
    p.add_argument("--prefix-chat", action="store_true",
                   help="measure the prefix cache on 10-turn conversations instead (see the docstring)")
    p.add_argument("--chat-repeats", type=int, default=3,
                   help="--prefix-chat: conversations per server, each about its own image (default: %(default)s)")
    args = p.parse_args(argv)
    if args.prefix_chat and "--models" not in (sys.argv if argv is None else argv):
        args.models = "mid"  # the default model's soft prompt reads the question: no prefix to keep
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("serve_cpu_prefix.json" if args.prefix_chat else "serve_cpu.json")
    if args.quick:
        args.concurrency = "1,4,16"
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - set(QUESTIONS):
        p.error(f"unknown model(s) {sorted(unknown)}: choose from default, mid")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if set(args.configs) - {"off", "on", "whole"} or args.configs[:1] != ["off"]:
        p.error(f"--configs {','.join(args.configs)}: off first, then any of on, whole")

    import torch
    import transformers

    machine = {"cpu_count": os.cpu_count(), "server_threads": args.threads or torch.get_num_threads(),
               "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
               "dtype": args.dtype, "load_before": round(os.getloadavg()[0], 2)}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    if args.prefix_chat:
        return write_prefix_chat(models, machine, args, started)
    for model in models:
        path = str(bi.cached_checkpoint(args.model_cache)) if model == "mid" else "default"
        print(f"{model} model ({path})", flush=True)
        runs = {config: run_config(model, path, config, args) for config in args.configs}
        compared = [row for config in args.configs[1:]
                    for row in compare(model, config, runs["off"], runs[config])]
        results[model] = {**runs, "compare": compared}
    machine["load_after"] = round(os.getloadavg()[0], 2)
    total = time.perf_counter() - started

    table = markdown(results, machine, args, total)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model_cache")}
    cmd = sys.argv if argv is None else [__file__, *argv]
    settings["command"] = " ".join([Path(sys.executable).name, *cmd])
    report = {"machine": machine, "settings": settings, "total_s": total, "models": results}
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    lone = [r for m in results.values() for r in m["compare"] if r["concurrency"] == 1]
    return 1 if sum(r["mismatches"] for r in lone) else 0


def write_prefix_chat(models: list[str], machine: dict, args: argparse.Namespace, started: float) -> int:
    results = {}
    for model in models:
        path = str(bi.cached_checkpoint(args.model_cache)) if model == "mid" else "default"
        print(f"{model} model ({path})", flush=True)
        results[model] = prefix_chat(model, path, args)
    machine["load_after"] = round(os.getloadavg()[0], 2)
    total = time.perf_counter() - started
    table = prefix_markdown(results, machine, args, total)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model_cache")}
    settings["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "total_s": total,
                                    "models": results}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if any(r["mismatches"] for r in results.values()) else 0


def markdown(results: dict, machine: dict, args: argparse.Namespace, total: float) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [f"{machine['cpu_count']} CPUs ({machine['processor']}), server torch threads "
             f"{machine['server_threads']}, torch {machine['torch']}, {args.device} {args.dtype}; "
             f"streamed chat completions, greedy, max_tokens {args.max_tokens}; --max-wait-ms "
             f"{args.max_wait_ms:g}; load average {machine['load_before']} before, "
             f"{machine['load_after']} after; "
             f"{total / 60:.1f} min in all", "",
             *(f"- {c}: `{' '.join(server_flags(c, args))}`" for c in args.configs), "",
             "| model | batching | c | requests | req/s (= img/s) | tokens/s | TTFT p50 / p95 / p99 s "
             "| latency p50 / p95 / p99 s | errors | mean group | encoded | server cores busy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, res in results.items():
        for name in args.configs:
            for r in res[name]["levels"]:
                lines.append(
                    f"| {model} | {name} | {r['concurrency']} | {r['requests']} | {s(r['requests_per_s'])} | "
                    f"{s(r['tokens_per_s'])} | {' / '.join(s(r[f'ttft_p{q}_s']) for q in (50, 95, 99))} | "
                    f"{' / '.join(s(r[f'latency_p{q}_s']) for q in (50, 95, 99))} | {r['errors']} | "
                    f"{s(r['mean_batch'])} | {r['encoded']} | {s(r['server_cores_busy'])} |")
    lines += ["", "| model | batching | c | req/s off | req/s | / off | lone latency s | p95 s | p95 / lone "
                  "| answers differing from off |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    aims = []
    for model, res in results.items():
        for r in res["compare"]:
            lines.append(f"| {model} | {r['batching']} | {r['concurrency']} | {s(r['off_requests_per_s'])} "
                         f"| {s(r['on_requests_per_s'])} | {s(r['throughput_ratio'])} "
                         f"| {s(r['lone_latency_s'])} | {s(r['on_latency_p95_s'])} "
                         f"| {s(r['on_p95_over_lone'])} "
                         f"| {r['mismatches']} of {r['compared']} |")
            if r["concurrency"] == 16 and r["throughput_ratio"] and r["on_p95_over_lone"]:
                met = r["throughput_ratio"] >= 3 and r["on_p95_over_lone"] <= 2
                aims.append(f"{model} {r['batching']}: {r['throughput_ratio']:.2f}x throughput, p95 "
                            f"{r['on_p95_over_lone']:.2f}x lone ({'met' if met else 'not met'})")
    lines += ["", "req/s: successful requests per second; each carries one image, so images/s is the same "
                  "number. mean group: requests per batch the worker formed (off and whole: one generate "
                  "call; on: requests admitted together, sharing one vision + Q-Former pass; the running "
                  "decode batch can hold more). encoded: images the server encoded (cache misses). lone "
                  "latency: median at c = 1, batching off. Aim at c = 16 (>= 3x throughput, p95 <= 2x lone): "
              + ("; ".join(aims) or "c = 16 not run") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
