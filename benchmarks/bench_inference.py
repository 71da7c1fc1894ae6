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

    python benchmarks/bench_inference.py                 # full run, 1 thread (~5 min on this CPU)
    python benchmarks/bench_inference.py --threads 0     # all cores (~3 min on an idle 2-core CPU)
    python benchmarks/bench_inference.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
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
    same_tokens: bool | None = None

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
    def best_ratio(self) -> float:
        """The same from each side's fastest call: less sensitive to other load on a shared machine."""
        return min(self.theirs_s) / min(self.ours_s)

    def as_dict(self) -> dict:
        return {
            **asdict(self), "theirs_median_s": statistics.median(self.theirs_s),
            "ours_median_s": statistics.median(self.ours_s), "theirs_per_s": self.theirs_per_s,
            "ours_per_s": self.ours_per_s, "ratio": self.ratio, "best_ratio": self.best_ratio,
        }


def run_row(row: Row, theirs: Callable[[], object], ours: Callable[[], object], warmup: int, reps: int,
            same: Callable[[object, object], bool]) -> Row:
    """Warm-up, then `reps` timed calls of each, interleaved so drift (thermal, other load) hits both alike."""
    for _ in range(warmup):
        a, b = theirs(), ours()
    row.same_tokens = same(a, b) if warmup else None
    threads = torch.get_num_threads()
    for _ in range(reps):
        for fn, times, shares in ((theirs, row.theirs_s, row.theirs_cpu_share), (ours, row.ours_s, row.ours_cpu_share)):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - start)
            shares.append(round((time.process_time() - cpu) / (times[-1] * threads), 2))
    print(f"  {row.task}: transformers {row.theirs_per_s:.2f} {row.unit}/s, ours {row.ours_per_s:.2f} {row.unit}/s"
          f"  (same tokens: {row.same_tokens})\n    calls: transformers {_secs(row.theirs_s, row.theirs_cpu_share)};"
          f" ours {_secs(row.ours_s, row.ours_cpu_share)}", flush=True)
    return row


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
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inference_cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.batch_size = 1, 1, 2

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
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        hf, tokenizer = save_checkpoint(folder)
        hf.to(device, dtype)
        ours = blip2.load(folder, device=device, dtype=dtype)
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
        for beams in (1, 5):
            gen = {**fixed_length(CAPTION_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
            name = f"caption, {'greedy' if beams == 1 else f'{beams} beams'}, batch {args.batch_size}, {CAPTION_TOKENS} tokens"
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

        def ours_ask(gen: dict) -> torch.Tensor:
            # What `Blip2.ask` does with one image: the image encoded once, its features expanded to one row per
            # question, then the Q-Former (which reads the question too where the model feeds it one).
            feats = model.encode_image(one)  # (1, N, Dv)
            soft = ours.soft_prompts(feats.expand(n, -1, -1), QUESTIONS)  # (n, Q, H)
            return model.generate(input_ids=q_ids, attention_mask=q_mask, soft_prompt=soft, **gen)

        for beams in (1, 5):
            gen = {**fixed_length(ANSWER_TOKENS, beams), "pad_token_id": tokenizer.pad_token_id}
            if beams > 1:
                gen["length_penalty"] = -1.0  # the VQA default
            name = f"ask, {n} questions about 1 image, {'greedy' if beams == 1 else f'{beams} beams'}, {ANSWER_TOKENS} tokens"
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

        rows.append(run_row(
            Row(f"ask end to end (PIL + strings -> strings), {n} questions, greedy", "answer", n),
            hf_ask_e2e, lambda: ours.ask(pil, QUESTIONS, num_beams=1, max_new_tokens=ANSWER_TOKENS,
                                         min_new_tokens=ANSWER_TOKENS),
            args.warmup, args.reps, lambda a, b: a == b,
        ))

    machine["load_after"] = round(_load(), 2)
    print_table(rows, machine, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine, "settings": {"reps": args.reps, "warmup": args.warmup, "batch_size": args.batch_size,
                                         "quick": args.quick, "command": " ".join([Path(sys.executable).name] + sys.argv)},
        "rows": [r.as_dict() for r in rows],
    }, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(r.same_tokens is not False for r in rows) or args.dtype != "float32" else 1


def print_table(rows: list[Row], machine: dict, args: argparse.Namespace) -> None:
    print(f"\n{machine['cpu_count']} CPUs ({machine['torch_threads']} threads), torch {machine['torch']}, "
          f"transformers {machine['transformers']}, {args.device} {args.dtype}; {args.reps} calls per side after "
          f"{args.warmup} warm-up; load average {machine['load_before']} before, {machine['load_after']} after\n")
    print("| task | transformers /s | ours /s | ours / transformers | best call: transformers /s | ours /s "
          "| ours / transformers | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        same = {True: "yes", False: "**no**", None: "-"}[r.same_tokens]
        print(f"| {r.task} ({r.unit}s/s) | {r.theirs_per_s:.2f} | {r.ours_per_s:.2f} | {r.ratio:.2f} | "
              f"{r.items / min(r.theirs_s):.2f} | {r.items / min(r.ours_s):.2f} | {r.best_ratio:.2f} | {same} |")
    print("\n(first three numbers: medians; then each side's fastest call)")
    shares = [c for r in rows for c in r.theirs_cpu_share + r.ours_cpu_share]
    contended = sum(c < CONTENDED for c in shares)
    if contended:
        print(f"warning: {contended} of {len(shares)} calls got less than {CONTENDED:.0%} of the cores they asked for "
              "(other processes were using them): those medians are unreliable; compare the best-call columns, "
              "or run again on an idle machine.")


if __name__ == "__main__":
    sys.exit(main())
