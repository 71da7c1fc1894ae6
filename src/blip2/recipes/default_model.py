"""`make default-model`: train the embedded default model with our own recipes, from PyPI packages only.

    python -m blip2.recipes.default_model [--work runs/default] [--device cuda] [--resume] [--stage2 steps=N ...]

1. data:   easy-VQA *train* split only (never test): captions "a {colour} {shape}" derived from each image's
           answers (one ITC class per colour-shape pair, so same-caption images are positives); for stage 2
           the 38,575 questions with their answers, the 4,000 captions and 16,000 chat turns derived from the
           same labels ("what shape is this?" -> "circle", then "what color is it?" -> "red").
2. cache:  EfficientNet-Lite0 runs once over the 4,000 train images (augmentation off).
3. stage 1 (configs/default_stage1.yaml): ITC + ITM + ITG; Q-Former initialised from all-MiniLM-L6-v2.
4. stage 2 (configs/default_stage2.yaml): SmolLM2-135M-Instruct (GGUF) frozen; the question also feeds the
           Q-Former (`question_to_qformer`), which trains with the projection.
5. re-fit (configs/default_refit.yaml): stage 1 on the captions again, training only the ITC/ITM/ITG heads,
           so itm/retrieve match the Q-Former stage 2 left.
6. export: the trainable weights (float16) + config + tokenizers into src/blip2/default/.

Every stage resumes from its checkpoints (`--resume`), so a run cut off at any point continues.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from blip2.eval import easy_vqa

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
PACKAGE_DEFAULT = Path(__file__).resolve().parents[1] / "default"


# Chat turns derived from each train image's labels: the pronoun questions of a conversation ("what shape is
# this?" then "what color is it?") never occur in easy-VQA's own templates.
CHAT_OPENERS = {"shape": ("what shape is this?", "what is this shape?"), "colour": ("what color is this?", "what color is the shape?")}
CHAT_FOLLOW_UPS = {"shape": ("what shape is it?", "and its shape?"), "colour": ("what color is it?", "what colour is it?", "and its color?")}


def chat_records(image: str, colour: str, shape: str, rng: random.Random) -> list[dict]:
    """Four VQA records for one image: a pronoun question alone, the other attribute as a follow-up (both
    orders), and a yes/no follow-up, each in the `history` form Blip2.chat prompts with."""
    answer = {"shape": shape, "colour": colour}
    first, second = rng.sample(("shape", "colour"), 2)
    opener = rng.choice(CHAT_OPENERS[first])
    probe = rng.choice(easy_vqa.COLOURS)
    return [
        {"image": image, "question": rng.choice(CHAT_OPENERS[second]), "answers": [answer[second]]},
        {"image": image, "question": rng.choice(CHAT_FOLLOW_UPS[second]), "answers": [answer[second]],
         "history": [[opener, answer[first]]]},
        {"image": image, "question": rng.choice(CHAT_FOLLOW_UPS[first]), "answers": [answer[first]],
         "history": [[rng.choice(CHAT_OPENERS[second]), answer[second]]]},
        {"image": image, "question": f"is it {probe}?", "answers": ["yes" if probe == colour else "no"],
         "history": [[opener, answer[first]]]},
    ]


def write_data(work: Path) -> dict[str, Path]:
    """Train-split annotation files: captions.jsonl (stage 1) and stage2.jsonl (questions, captions, chat)."""
    work.mkdir(parents=True, exist_ok=True)
    labels = easy_vqa.image_labels("train")
    texts = easy_vqa.all_caption_texts()
    qs = easy_vqa.questions("train")
    paths = {q.image_id: Path(q.image) for q in qs}
    captions = work / "captions.jsonl"
    with captions.open("w") as f:
        for image_id, (colour, shape) in sorted(labels.items()):
            text = easy_vqa.caption_text(colour, shape)
            f.write(json.dumps({"image": paths[image_id].name, "text": text, "image_id": texts.index(text)}) + "\n")
    stage2 = work / "stage2.jsonl"
    rng = random.Random(0)
    with stage2.open("w") as f:
        for q in qs:
            f.write(json.dumps({"image": Path(q.image).name, "question": q.question, "answers": [q.answer]}) + "\n")
        for image_id, (colour, shape) in sorted(labels.items()):  # an empty question = a caption record
            name = paths[image_id].name
            f.write(json.dumps({"image": name, "question": "", "answers": [easy_vqa.caption_text(colour, shape)]}) + "\n")
            for record in chat_records(name, colour, shape, rng):
                f.write(json.dumps(record) + "\n")
    return {"captions": captions, "stage2": stage2, "images": paths[next(iter(paths))].parent}


def export(stage2_final: Path, target: Path = PACKAGE_DEFAULT) -> Path:
    """Copy a trained default model into the package: trainable weights as float16 safetensors (the repo
    stays lean), config, tokenizers. Frozen parts stay referenced by their packages."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for item in stage2_final.iterdir():
        if item.name == "model.safetensors":
            state = load_file(item)
            half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
            save_file(half, target / item.name, metadata={"format": "pt"})
        elif item.is_dir():
            shutil.copytree(item, target / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target / item.name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2.recipes.default_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/default", help="working folder (data, cache, runs)")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its latest checkpoint")
    parser.add_argument("--skip-export", action="store_true", help="do not copy the result into the package")
    parser.add_argument("--only", choices=["data", "cache", "stage1", "stage2", "refit", "export"], default=None,
                        help="run one step of the pipeline (the earlier ones' outputs must exist)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for the feature cache and every stage")
    for stage in ("stage1", "stage2", "refit"):
        parser.add_argument(f"--{stage}", nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"config overrides for {stage} (e.g. batch_size=64 lr=2e-4)")
    args = parser.parse_args(argv)

    from blip2.recipes import run_recipe

    work = Path(args.work)
    resume = ["--resume"] if args.resume else []
    files = write_data(work)
    cache = work / "features-train"
    if args.only in (None, "cache") and not (cache / "index.json").exists():
        code = run_recipe("cache-features", ["--model", "preset:default", "--data", str(files["captions"]),
                                             "--image-root", str(files["images"]), "--out", str(cache),
                                             "--device", args.device, "--batch-size", "128"])
        if code:
            return code
    common = ["data.augment=false", f"data.feature_cache={cache}", f"data.image_root={files['images']}",
              f"device={args.device}"]
    # (stage, recipe, config, data, starts from): each stage's `final` is the next one's init_from.
    stages = [("stage1", "stage1", "default_stage1.yaml", files["captions"], None),
              ("stage2", "stage2", "default_stage2.yaml", files["stage2"], "stage1"),
              ("refit", "stage1", "default_refit.yaml", files["captions"], "stage2")]
    for name, recipe, config, data, start in stages:
        if args.only not in (None, name):
            continue
        init = [f"init_from={work / start / 'final'}"] if start else []
        code = run_recipe(recipe, ["--config", str(CONFIGS / config), *resume, *common, f"data.path={data}", *init,
                                   f"output_dir={work / name}", *getattr(args, name)])
        if code:
            return code
    if args.only in (None, "export") and not args.skip_export:
        print(f"default model exported to {export(work / 'refit' / 'final')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
