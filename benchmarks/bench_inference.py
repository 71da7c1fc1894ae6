"""Inference speed against transformers on the same weights, in the same run (DESIGN §6: ratios, not asserts).

One random-weight BLIP-2 of a mid-size config (ViT-B/14 at 224 px, a 12-layer Q-Former with 32 queries, an
OPT-125m-sized LLM) is built as transformers' `Blip2ForConditionalGeneration`, saved to a temp folder with a
word-level tokenizer, and loaded back by `blip2.load`. Each task runs on both, interleaved rep by rep, and the
table gives the median throughput and ours / transformers.

Model rows time the model work only: pixel tensors and token ids in, token ids out (image preprocessing,
tokenization and decoding excluded for both). Both sides do what their user-facing call does:
transformers' `generate(pixel_values, input_ids=[image tokens; prompt])`, ours `encode_image ->
soft_prompt -> generate` as `Blip2.caption` / `Blip2.ask` do (`ask` encodes one image once for all its
questions; transformers has no such path, so it gets the image repeated once per question). The `end to end`
row adds preprocessing and decoding on both sides (PIL image + strings in, strings out): `Blip2.ask` against
transformers' image processor + tokenizer + generate + batch_decode.

Every generation is given a fixed length (min_new_tokens = max_new_tokens) so both sides do the same number
of decoding steps, and the generated ids are compared.

Chat rows: a conversation of `--chat-turns` questions about one image, greedy and 5 beams; ours is
`Blip2.chat(image).ask(q)` (the image encoded once, the LLM's key/value cache kept between turns), transformers
re-runs the whole conversation prompt with the image through `generate` every turn; turn 1, 5 and 10 are timed
and the answers compared. bf16 rows: ours loaded in bfloat16 against ours in float32 on the caption and ask
calls, with the share of tokens that stay equal (bf16 rounds differently: equality is not expected).

Each call's CPU seconds are recorded next to its wall time: with one thread they measure the work done whatever
other processes take, so on a shared machine the CPU-time ratio is the one to read.

    python benchmarks/bench_inference.py                 # full run, 1 thread (~15 min on this CPU, idle)
    python benchmarks/bench_inference.py --threads 0     # all cores (~3 min on an idle 2-core CPU)
    python benchmarks/bench_inference.py --quick         # smoke run
    python benchmarks/bench_inference.py --compile-decode  # ours with compile_decode=True: greedy rows only

`--compile-decode` loads ours with `compile_decode=True` (a static key/value cache and a compiled decode step,
fast_decode.py) and runs the greedy rows only (caption, 8 questions, chat), against transformers' plain
generate on the same weights; each row's first call, which compiles, is timed apart from the timed calls
(`first_calls` in the JSON), and the table goes to the `.md` next to the JSON too
(benchmarks/results/inference_cpu_compiled.{json,md}).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
    PreTrainedTokenizerFast,
)

import blip2
from blip2.data.text import chat_prompt

VOCAB = 50272  # OPT's
IMAGE_TOKEN = 50265  # inside the vocabulary, past the words the prompts use
NUM_QUERIES = 32
IMAGE_SIZE = 224
CAPTION_TOKENS = 20
ANSWER_TOKENS = 10
QUESTIONS = [
    "what is in the picture ?",
    "what color is the car ?",
    "how many people are there ?",
    "is it day or night ?",
    "where was this photo taken ?",
    "what is the man holding ?",
    "is there a dog ?",
    "what is on the table next to the window ?",
]
VQA_TEMPLATE = "Question: {} Answer:"  # REFERENCE §3, what `Blip2.ask` uses for decoder-only LLMs
CONTENDED = 0.75  # a call whose CPU share falls below this shared the cores with other processes
MID_CACHE = Path(__file__).resolve().parent.parent / "runs" / "bench" / "mid-random"  # cached_checkpoint's
TASKS = ("caption", "ask", "e2e", "chat", "bf16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ checkpoint


def hf_config() -> Blip2Config:
    vision = Blip2VisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=IMAGE_SIZE, patch_size=14,
    )
    qformer = Blip2QFormerConfig(encoder_hidden_size=768, cross_attention_frequency=2)  # 12 x 768 by default
    text = OPTConfig(  # OPT-125m's shape
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, vocab_size=VOCAB,
        max_position_embeddings=2048, word_embed_proj_dim=768, bos_token_id=2, eos_token_id=2, pad_token_id=1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """N(0, 0.02) everywhere (query tokens included: transformers leaves them at zero), LayerNorm weights near 1.
    A small std keeps 12 pre-LN layers' activations finite, so the tokens generated are well defined."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("layer_norm" in name.lower() or "layernorm" in name.lower()):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """An OPT-like word-level tokenizer (</s> as BOS, pad 1) over the prompts' words, padded to the vocab."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = sorted({w for q in QUESTIONS for w in VQA_TEMPLATE.format(q).split()})
    tokens = specials + words
    tokens += [f"w{i}" for i in range(len(tokens), VOCAB)]
    tokens[IMAGE_TOKEN] = "<image>"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="</s>", eos_token="</s>"
    )


def save_checkpoint(folder: Path) -> tuple[Blip2ForConditionalGeneration, PreTrainedTokenizerFast]:
    model = Blip2ForConditionalGeneration(hf_config()).eval()
    randomize(model)
    model.save_pretrained(folder)
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    return model, tokenizer


def cached_checkpoint(cache: Path = MID_CACHE) -> Path:
    """`save_checkpoint`'s folder, saved once under `cache` and reused (rebuilt when `hf_config` changes):
    what bench_serve.py and bench_collections.py load."""
    stamp = hashlib.sha256(hf_config().to_json_string(use_diff=False).encode()).hexdigest()[:16]
    if (cache / "bench_stamp").is_file() and (cache / "bench_stamp").read_text() == stamp:
        return cache
    tmp = cache.with_name(cache.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    save_checkpoint(tmp)
    (tmp / "bench_stamp").write_text(stamp)
    if cache.exists():
        shutil.rmtree(cache)
    tmp.rename(cache)
    print(f"built and saved the mid-size model in {time.perf_counter() - start:.0f}s: {cache}", flush=True)
    return cache


def images(n: int, seed: int = 0, height: int = 320, width: int = 400) -> list[Image.Image]:
    """Synthetic RGB photos-to-be (gradients plus noise), different per index, resized by preprocessing."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = np.linspace(0, 255, width)[None, :, None] * (i + 1) / (n + 1)
        arr = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


# --------------------------------------------------------------------------------------------------- timing


@dataclass
class Row:
    task: str
    unit: str
    items: int  # images (captions) or answers per call
    theirs_s: list[float] = field(default_factory=list)
    ours_s: list[float] = field(default_factory=list)
    # CPU time / (wall time x threads) per call: near 1 when the cores were ours, lower when others took them.
    theirs_cpu_share: list[float] = field(default_factory=list)
    ours_cpu_share: list[float] = field(default_factory=list)
    # This process's CPU seconds per call. With one thread that is the work done, whatever the neighbours took:
    # on a shared machine the CPU-time ratio is the one to read (wall times stretch with the others' load).
    theirs_cpu_s: list[float] = field(default_factory=list)
    ours_cpu_s: list[float] = field(default_factory=list)
    same_tokens: bool | None = None
    baseline: str = "transformers"  # what the `theirs` side is: transformers, or ours in float32 for bf16 rows
    # bf16 rows: share of generated tokens equal to the baseline's (bf16 rounds differently, so tokens may change)
    token_agreement: float | None = None

    @property
    def theirs_per_s(self) -> float:
        return self.items / statistics.median(self.theirs_s)

    @property
    def ours_per_s(self) -> float:
        return self.items / statistics.median(self.ours_s)

    @property
    def ratio(self) -> float:
        """ours / transformers throughput, from the medians."""
        return self.ours_per_s / self.theirs_per_s

    @property
    def cpu_ratio(self) -> float:
        """ours / transformers throughput from the median CPU seconds per call."""
        return statistics.median(self.theirs_cpu_s) / statistics.median(self.ours_cpu_s)

    @property
    def best_ratio(self) -> float:
        """The same from each side's fastest call: less sensitive to other load on a shared machine."""
        return min(self.theirs_s) / min(self.ours_s)

    def as_dict(self) -> dict:
        return {
            **asdict(self), "theirs_median_s": statistics.median(self.theirs_s),
            "ours_median_s": statistics.median(self.ours_s), "theirs_per_s": self.theirs_per_s,
            "ours_per_s": self.ours_per_s, "ratio": self.ratio, "best_ratio": self.best_ratio,
            "cpu_ratio": self.cpu_ratio,
        }


def run_row(row: Row, theirs: Callable[[], object], ours: Callable[[], object], warmup: int, reps: int,
            same: Callable[[object, object], bool]) -> Row:
    """Warm-up, then `reps` timed calls of each, interleaved so drift (thermal, other load) hits both alike."""
    for _ in range(warmup):
        a, b = theirs(), ours()
    row.same_tokens = same(a, b) if warmup else None
    threads = torch.get_num_threads()
    for _ in range(reps):
        for fn, times, shares, cpus in ((theirs, row.theirs_s, row.theirs_cpu_share, row.theirs_cpu_s),
                                        (ours, row.ours_s, row.ours_cpu_share, row.ours_cpu_s)):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
            shares.append(round(cpus[-1] / (times[-1] * threads), 2))
    print(f"  {row.task}: {row.baseline} {row.theirs_per_s:.2f} {row.unit}/s, ours {row.ours_per_s:.2f} {row.unit}/s"
          f"  (CPU-time ratio {row.cpu_ratio:.2f}; same tokens: {row.same_tokens})\n    calls: {row.baseline} {_secs(row.theirs_s, row.theirs_cpu_share)};"
          f" ours {_secs(row.ours_s, row.ours_cpu_share)}", flush=True)
    return row


def run_chat_row(rows: list[Row], name: str, turns: list[int], theirs: Callable[[], list[tuple[float, float, str]]],
                 ours: Callable[[], list[tuple[float, float, str]]], reps: int, warmup: int) -> None:
    """Chat: each call is a whole conversation (max(turns) turns) on each side, interleaved; every turn is timed
    on its own and the rows keep turns `turns`. Answers are compared turn by turn."""
    threads = torch.get_num_threads()
    out = {t: Row(f"{name}, turn {t}", "turn", 1) for t in turns}
    same = True
    for i in range(warmup + reps):
        for side, fn in (("theirs", theirs), ("ours", ours)):
            results = fn()  # (wall s, CPU s, answer) per turn
            if side == "theirs":
                answers = [a for _, _, a in results]
            else:
                same = same and answers == [a for _, _, a in results]
            if i < warmup:
                continue
            for t in turns:
                wall, cpu, _ = results[t - 1]
                getattr(out[t], f"{side}_s").append(wall)
                getattr(out[t], f"{side}_cpu_s").append(cpu)
                getattr(out[t], f"{side}_cpu_share").append(round(cpu / (wall * threads), 2))
    for t in turns:
        out[t].same_tokens = same
        r = out[t]
        print(f"  {r.task}: transformers {statistics.median(r.theirs_s):.2f}s, ours {statistics.median(r.ours_s):.2f}s"
              f"  (CPU {statistics.median(r.theirs_cpu_s):.2f}s / {statistics.median(r.ours_cpu_s):.2f}s; same answers: "
              f"{same})", flush=True)
        rows.append(r)


def _load() -> float:
    """1-minute load average (other processes competing for the cores), or 0 where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _secs(times: list[float], shares: list[float]) -> str:
    return ", ".join(f"{t:.2f}s ({100 * c:.0f}% CPU)" for t, c in zip(times, shares))


def fixed_length(tokens: int, beams: int) -> dict:
    gen = {"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": beams, "do_sample": False}
    if beams > 1:
        gen["length_penalty"] = 1.0
    return gen


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=5, help="timed calls per task and side (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="images per captioning call")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, both sides; 0 = all cores. 1 by default: where another job holds a "
                        "core, two OpenMP threads wait on each other and calls stretch 10x or more, one thread does not")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 1 rep, batch 2")
    p.add_argument("--chat-turns", type=int, default=10, help="turns per conversation in the chat rows (0: no chat rows)")
    p.add_argument("--chat-reps", type=int, default=3, help="timed conversations per side for the chat rows")
    p.add_argument("--bf16-reps", type=int, default=3,
                   help="timed calls per side for the bf16 rows (ours bfloat16 vs ours float32; 0: no bf16 rows)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inference_cpu.json")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated rows to run, of {','.join(TASKS)}")
    p.add_argument("--compile-decode", action="store_true",
                   help="ours loaded with compile_decode=True; greedy caption/ask/chat rows only; first (compiling) "
                        "calls timed apart; default --out benchmarks/results/inference_cpu_compiled.json")
    args = p.parse_args(argv)
    tasks = set(args.tasks.split(","))
    if not tasks <= set(TASKS):
        p.error(f"--tasks: unknown {sorted(tasks - set(TASKS))}; known: {','.join(TASKS)}")
    if args.quick:
        args.reps, args.warmup, args.batch_size, args.chat_turns, args.chat_reps, args.bf16_reps = 1, 1, 2, 5, 1, 1
    if args.compile_decode:
        tasks &= {"caption", "ask", "chat"}  # beam search and bf16 do not compile (fast_decode.compiles)
        if args.out == p.get_default("out"):
            args.out = args.out.with_name("inference_cpu_compiled.json")
    beam_counts = (1,) if args.compile_decode else (1, 5)
    first_calls: dict[str, dict] = {}  # --compile-decode: each row's first (compiling) call, on our side

    def first_call(name: str, fn: Callable[[], object]) -> None:
        if args.compile_decode:
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            first_calls[name] = {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(time.process_time() - cpu, 2)}
            print(f"  {name}: first call (compiles) {first_calls[name]['wall_s']}s, CPU {first_calls[name]['cpu_s']}s", flush=True)

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count())
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()
        or platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "blip2": getattr(blip2, "__version__", "0.1.0"),
        "device": str(device), "dtype": args.dtype, "load_before": round(_load(), 2),
        "compile_decode": args.compile_decode,
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        hf, tokenizer = save_checkpoint(folder)
        hf.to(device, dtype)
        ours = blip2.load(folder, device=device, dtype=dtype, compile_decode=args.compile_decode)
        # The bf16 rows: the same weights loaded again in bfloat16, against ours in float32.
        bf16 = args.bf16_reps and dtype == torch.float32 and "bf16" in tasks and not args.compile_decode
        ours_bf16 = blip2.load(folder, device=device, dtype=torch.bfloat16) if bf16 else None
        processor = BlipImageProcessorPil.from_pretrained(str(folder))  # transformers' side of end to end
        print(f"built, saved and loaded the checkpoint in {time.perf_counter() - start:.0f}s "
              f"({sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M parameters)", flush=True)

    model = ours.model
    pixels = ours.images(images(args.batch_size)).to(device, dtype)  # (B, 3, 224, 224), same tensor for both
    image_ids = torch.full((1, NUM_QUERIES), IMAGE_TOKEN, device=device)

    def with_image_tokens(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers' layout: Q image tokens (replaced by the soft prompt), then the (left padded) prompt.
        b = ids.shape[0]
        return torch.cat([image_ids.expand(b, -1), ids], 1), torch.cat([torch.ones_like(image_ids).expand(b, -1), mask], 1)

    def same(theirs: torch.Tensor, ours_ids: torch.Tensor) -> bool:
        new = theirs[:, theirs.shape[1] - ours_ids.shape[1] :]  # transformers returns the prompt too
        return bool(torch.equal(new.cpu(), ours_ids.cpu()))

    rows: list[Row] = []
    with torch.inference_mode():
        # 1-2. Captioning: B images, empty prompt (BOS only), a fixed number of tokens.
        bos = torch.full((args.batch_size, 1), tokenizer.bos_token_id, device=device)
        ones = torch.ones_like(bos)
        hf_ids, hf_mask = with_image_tokens(bos, ones)
        for beams in (beam_counts if 'caption' in tasks else ()):
            gen = {**fixed_length(CAPTION_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
            name = f"caption, {'greedy' if beams == 1 else f'{beams} beams'}, batch {args.batch_size}, {CAPTION_TOKENS} tokens"
            first_call(name, lambda gen=gen: model.generate(model.encode_image(pixels), bos, ones, **gen))
            rows.append(run_row(
                Row(name, "img", args.batch_size),
                lambda gen=gen: hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **gen),
                lambda gen=gen: model.generate(model.encode_image(pixels), bos, ones, **gen),
                args.warmup, args.reps, same,
            ))

        # 3. Eight questions about one image, greedy and with the VQA default beams (REFERENCE §6).
        prompts = [VQA_TEMPLATE.format(q) for q in QUESTIONS]
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding="longest")
        q_ids, q_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hf_q_ids, hf_q_mask = with_image_tokens(q_ids, q_mask)
        one = pixels[:1]
        n = len(prompts)

        def ours_ask(gen: dict, side: blip2.Blip2 = ours, pix: torch.Tensor = one) -> torch.Tensor:
            # What `Blip2.ask` does with one image: the image encoded once, its soft prompt computed once (it does
            # not read the question), and its keys/values computed once and shared by every question and beam.
            soft = side.soft_prompts(side.model.encode_image(pix))  # (1, Q, H)
            rows = torch.zeros(n, dtype=torch.long, device=device)
            return side.model.lm.generate_shared(soft, rows, q_ids, q_mask, **gen)

        for beams in (beam_counts if 'ask' in tasks else ()):
            gen = {**fixed_length(ANSWER_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
            if beams > 1:
                gen["length_penalty"] = -1.0  # the VQA default
            name = f"ask, {n} questions about 1 image, {'greedy' if beams == 1 else f'{beams} beams'}, {ANSWER_TOKENS} tokens"
            first_call(name, lambda gen=gen: ours_ask(gen))
            rows.append(run_row(
                Row(name, "answer", n),
                lambda gen=gen: hf.generate(pixel_values=one.expand(n, -1, -1, -1), input_ids=hf_q_ids,
                                            attention_mask=hf_q_mask, **gen),
                lambda gen=gen: ours_ask(gen),
                args.warmup, args.reps, same,
            ))

        # 4. The same greedy ask, end to end: PIL image and question strings in, answer strings out.
        pil = images(1, seed=1)[0]
        gen = fixed_length(ANSWER_TOKENS, 1)

        def hf_ask_e2e() -> list[str]:
            pix = processor(pil, return_tensors="pt")["pixel_values"].to(device, dtype)
            e = tokenizer(prompts, return_tensors="pt", padding="longest")
            ids, mask = with_image_tokens(e["input_ids"].to(device), e["attention_mask"].to(device))
            out = hf.generate(pixel_values=pix.expand(n, -1, -1, -1), input_ids=ids, attention_mask=mask,
                              pad_token_id=tokenizer.pad_token_id, **gen)
            return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]

        if "e2e" in tasks and not args.compile_decode:
            rows.append(run_row(
                Row(f"ask end to end (PIL + strings -> strings), {n} questions, greedy", "answer", n),
                hf_ask_e2e, lambda: ours.ask(pil, QUESTIONS, num_beams=1, max_new_tokens=ANSWER_TOKENS,
                                             min_new_tokens=ANSWER_TOKENS),
                args.warmup, args.reps, lambda a, b: a == b,
            ))

        # 5. Chat about one image: turn 1, 5 and 10 of a conversation. Ours: `Blip2.chat(image).ask(q)`, which
        # encodes the image once and keeps the LLM's key/value cache between turns. Transformers: each turn
        # re-runs the whole conversation prompt (history + question) with the image through `generate`. Both take
        # strings and return strings; the image is preprocessed once on both sides (ours: inside turn 1's time).
        if args.chat_turns and "chat" in tasks:
            chat_pil = images(1, seed=2)[0]
            chat_pix = processor(chat_pil, return_tensors="pt")["pixel_values"].to(device, dtype)
            chat_questions = [QUESTIONS[i % n] for i in range(args.chat_turns)]
            template = ours.question_template
            turns = sorted({1, min(5, args.chat_turns), args.chat_turns})
            for beams in beam_counts:
                gen = fixed_length(ANSWER_TOKENS, beams)

                def theirs_chat(gen: dict = gen) -> list[tuple[float, float, str]]:
                    history, out = [], []
                    for q in chat_questions:
                        start, cpu = time.perf_counter(), time.process_time()
                        e = tokenizer(chat_prompt(history, q, template), return_tensors="pt")
                        ids, mask = with_image_tokens(e["input_ids"].to(device), e["attention_mask"].to(device))
                        new = hf.generate(pixel_values=chat_pix, input_ids=ids, attention_mask=mask,
                                          pad_token_id=tokenizer.pad_token_id, **gen)
                        answer = tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True).strip()
                        out.append((time.perf_counter() - start, time.process_time() - cpu, answer))
                        history.append((q, answer))
                    return out

                def ours_chat(gen: dict = gen) -> list[tuple[float, float, str]]:
                    out, start, cpu = [], time.perf_counter(), time.process_time()
                    session = ours.chat(chat_pil, **gen)  # turn 1 includes preprocessing and encoding the image
                    for q in chat_questions:
                        answer = session.ask(q)
                        out.append((time.perf_counter() - start, time.process_time() - cpu, answer))
                        start, cpu = time.perf_counter(), time.process_time()
                    return out

                label = "greedy" if beams == 1 else f"{beams} beams"
                if args.compile_decode:  # the first conversation compiles (batch 1, and each cache bucket it reaches)
                    start, cpu = time.perf_counter(), time.process_time()
                    turn_s = [round(t, 2) for t, _, _ in ours_chat()]
                    first_calls[f"chat, {label}, first conversation"] = {
                        "wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(time.process_time() - cpu, 2),
                        "turns_s": turn_s}
                    print(f"  chat, {label}: first conversation (compiles) per turn {turn_s}", flush=True)
                run_chat_row(rows, f"chat, 1 image, {label}, {ANSWER_TOKENS} tokens per answer", turns, theirs_chat,
                             ours_chat, args.chat_reps, args.warmup)

        # 6. bf16: ours in bfloat16 against ours in float32 (same weights, same calls as rows 1-3).
        if ours_bf16 is not None and "bf16" in tasks:
            m16 = ours_bf16.model
            pix16 = pixels.to(torch.bfloat16)

            def agreement(row: Row) -> Callable[[torch.Tensor, torch.Tensor], bool]:
                def compare(fp32: torch.Tensor, bf16: torch.Tensor) -> bool:
                    row.token_agreement = round(float((fp32.cpu() == bf16.cpu()).float().mean()), 3)
                    return bool(torch.equal(fp32.cpu(), bf16.cpu()))
                return compare

            for beams in (1, 5):
                gen = {**fixed_length(CAPTION_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
                row = Row(f"bf16: caption, {'greedy' if beams == 1 else f'{beams} beams'}, batch {args.batch_size}, "
                          f"{CAPTION_TOKENS} tokens", "img", args.batch_size, baseline="ours float32")
                rows.append(run_row(
                    row, lambda gen=gen: model.generate(model.encode_image(pixels), bos, ones, **gen),
                    lambda gen=gen: m16.generate(m16.encode_image(pix16), bos, ones, **gen),
                    args.warmup, args.bf16_reps, agreement(row),
                ))
            gen = {**fixed_length(ANSWER_TOKENS, 1), "pad_token_id": tokenizer.pad_token_id}
            row = Row(f"bf16: ask, {n} questions about 1 image, greedy, {ANSWER_TOKENS} tokens", "answer", n,
                      baseline="ours float32")
            rows.append(run_row(row, lambda: ours_ask(gen), lambda: ours_ask(gen, ours_bf16, pix16[:1]), args.warmup, args.bf16_reps,
                                agreement(row)))

    machine["load_after"] = round(_load(), 2)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(rows, machine, args)
        if first_calls:
            print("\nFirst calls on our side (they compile; not in the timed calls above): "
                  + "; ".join(f"{k}: {v['wall_s']}s wall, {v['cpu_s']}s CPU" for k, v in first_calls.items()))
    print(table.getvalue(), end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine, "settings": {"reps": args.reps, "warmup": args.warmup, "batch_size": args.batch_size,
                                         "quick": args.quick, "command": " ".join([Path(sys.executable).name] + sys.argv)},
        "rows": [r.as_dict() for r in rows], "first_calls": first_calls,
    }, indent=2))
    if args.compile_decode:
        args.out.with_suffix(".md").write_text(
            "# bench_inference.py --compile-decode\n\n" + ", ".join(f"{k}={v}" for k, v in machine.items())
            + "\n" + table.getvalue())
    print(f"\nwrote {args.out}")
    exact = all(r.same_tokens is not False for r in rows if r.baseline == "transformers")
    return 0 if exact or args.dtype != "float32" else 1


def print_table(rows: list[Row], machine: dict, args: argparse.Namespace) -> None:
    print(f"\n{machine['cpu_count']} CPUs ({machine['torch_threads']} threads), torch {machine['torch']}, "
          f"transformers {machine['transformers']}, {args.device} {args.dtype}; {args.reps} calls per side after "
          f"{args.warmup} warm-up; load average {machine['load_before']} before, {machine['load_after']} after\n")
    print("| task | transformers /s | ours /s | ours / transformers | best call: transformers /s | ours /s "
          "| ours / transformers | CPU time: ours / transformers | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        if r.baseline != "transformers" or r.unit == "turn":
            continue
        same = {True: "yes", False: "**no**", None: "-"}[r.same_tokens]
        print(f"| {r.task} ({r.unit}s/s) | {r.theirs_per_s:.2f} | {r.ours_per_s:.2f} | {r.ratio:.2f} | "
              f"{r.items / min(r.theirs_s):.2f} | {r.items / min(r.ours_s):.2f} | {r.best_ratio:.2f} | {r.cpu_ratio:.2f} "
              f"| {same} |")
    print("\n(first three numbers: medians; then each side's fastest call; then the ratio of median CPU seconds)")
    chat = [r for r in rows if r.unit == "turn"]
    if chat:
        print("\n| chat turn latency | transformers s | ours s | ours / transformers (speed) | best call: transformers s "
              "| ours s | ours / transformers | CPU s: transformers | ours | ours / transformers | same answers |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
        for r in chat:
            same = {True: "yes", False: "**no**", None: "-"}[r.same_tokens]
            print(f"| {r.task} | {statistics.median(r.theirs_s):.2f} | {statistics.median(r.ours_s):.2f} | {r.ratio:.2f} "
                  f"| {min(r.theirs_s):.2f} | {min(r.ours_s):.2f} | {r.best_ratio:.2f} | {statistics.median(r.theirs_cpu_s):.2f} "
                  f"| {statistics.median(r.ours_cpu_s):.2f} | {r.cpu_ratio:.2f} | {same} |")
    bf16 = [r for r in rows if r.baseline != "transformers"]
    if bf16:
        print("\n| bf16 | ours fp32 /s | ours bf16 /s | bf16 / fp32 | best call: fp32 /s | bf16 /s | bf16 / fp32 "
              "| CPU time: bf16 / fp32 | tokens equal to fp32 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in bf16:
            print(f"| {r.task} ({r.unit}s/s) | {r.theirs_per_s:.2f} | {r.ours_per_s:.2f} | {r.ratio:.2f} | "
                  f"{r.items / min(r.theirs_s):.2f} | {r.items / min(r.ours_s):.2f} | {r.best_ratio:.2f} "
                  f"| {r.cpu_ratio:.2f} | {100 * (r.token_agreement or 0):.0f}% |")
    shares = [c for r in rows for c in r.theirs_cpu_share + r.ours_cpu_share]
    contended = sum(c < CONTENDED for c in shares)
    if contended:
        print(f"warning: {contended} of {len(shares)} calls got less than {CONTENDED:.0%} of the cores they asked for "
              "(other processes were using them): those medians are unreliable; compare the best-call columns, "
              "or run again on an idle machine.")


if __name__ == "__main__":
    sys.exit(main())
