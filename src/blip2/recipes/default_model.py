"""`make default-model`: train the embedded default model with our own recipes, from PyPI packages only.

    python -m blip2.recipes.default_model [--work runs/default] [--device cuda] [--resume] [--stage2 steps=N ...]
        [--views 2] [--rendered 4000] [--limit-images N] [--instructions] [--start-from default|DIR]
        [--repeat COLOUR=N ...]

1. data:   the easy-VQA *train* split only (never test), each image with 2 augmented views (new size,
           stretch, small rotation, position, pale background, hard edges half the time; the shape's colour
           is never touched), and 4,000 images of our own renderer (blip2.data.shapes): 16,000 image files
           under work/images/.
           Per image: a caption "a {colour} {shape}" (one ITC class per colour-shape pair, so same-caption
           images are positives); for stage 2 its questions (easy-VQA's 38,575 for an original and for each
           of its views; 10 of our own per rendered image), the caption and 4 chat turns derived from the
           labels ("what shape is this?" -> "circle", then "what color is it?" -> "red").
2. cache:  EfficientNet-Lite0 runs once over the 16,000 image files (the per-step crop/flip stays off: the
           augmentation is in the files).
3. stage 1 (configs/default_stage1.yaml): ITC + ITM + ITG; Q-Former initialised from all-MiniLM-L6-v2.
4. stage 2 (configs/default_stage2.yaml): SmolLM2-135M-Instruct (GGUF) frozen; the question also feeds the
           Q-Former (`question_to_qformer`), which trains with the projection. `--instructions` makes it an
           instruction tuning (configs/instruct_stage2.yaml's switch): each caption, question and chat turn
           phrased by a template drawn per sample (data/instructions.py) instead of "Question: {} Answer:".
5. re-fit (configs/default_refit.yaml): stage 1 on the captions again, training only the ITC/ITM/ITG heads,
           so itm/retrieve match the Q-Former stage 2 left.
6. export: the trainable weights (float16) + config + tokenizers into src/blip2/default/.

`--start-from default` (or a stage-2 model folder) skips stage 1 and continues stage 2 from that model's
weights instead (stage 2's `init_from`), then re-fits and exports as usual: a fine-tune of the shipped bridge
on the new data, for machines where the whole run would take too long (a CPU). Give it fewer, gentler steps
(`--stage2 steps=400 lr=5e-5 ...`). `--repeat brown=3` writes the stage-2 records of every brown image three
times, so a fine-tune aimed at the colours a model still confuses sees them more often.

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


# Offline augmentation (blip2.data.shape_augment): stages 1-2 train from a cache of frozen features, which
# holds one feature map per image file, so an augmented view has to be an image file of its own. Each
# easy-VQA train image gets VIEWS re-drawn views (new size, stretch, small rotation, position, background
# tint, edges; never a colour change), and RENDERED images of our own renderer (blip2.data.shapes) join them.
# Every view and rendered image gets the records its labels give: questions, a caption, chat turns.
VIEWS = 2
RENDERED = 4000
RENDER_SEED = "default-model:train"  # never shapes-vqa:test's seed (blip2.eval.shapes_vqa)
# Questions per rendered image: colour questions weigh more than in easy-VQA (1.3 a image) because colour
# is what the model got wrong on new images; shape and yes/no questions as easy-VQA asks them.
RENDERED_KINDS = ("colour",) * 3 + ("shape",) * 2 + ("yes/no",) * 5
IMAGES_VERSION = 1  # bump when the views or the renders change, so a work folder re-draws them


def _write_images(root: Path, labels: dict[int, tuple[str, str]], paths: dict[int, Path], views: int,
                  rendered: int) -> list[dict]:
    """Copies of the originals, their augmented views and the rendered images under `root`; returns the
    rendered images' records. Skipped when `root` already holds this exact set (its manifest says so)."""
    from PIL import Image

    from blip2.data import shape_augment, shapes

    settings = {"version": IMAGES_VERSION, "images": sorted(labels), "views": views, "rendered": rendered}
    manifest = root / "manifest.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved["settings"] == settings:
            return saved["rendered"]
        manifest.unlink()
    for sub in ("easy-vqa", "augmented"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (colour, shape) in sorted(labels.items()):
        shutil.copyfile(paths[image_id], root / "easy-vqa" / paths[image_id].name)
        with Image.open(paths[image_id]) as im:
            original = im.convert("RGB")
        for k in range(views):
            rng = random.Random(f"augment:{image_id}:{k}")
            view = shape_augment.augment(original, rng, shape, colour)
            view.save(root / "augmented" / f"{image_id}-{k}.png")
    drawn = shapes.render_set(root / "rendered", shapes.balanced_labels(rendered), RENDER_SEED,
                              RENDERED_KINDS)
    records = [{"image": f"rendered/{r.image}", "colour": r.colour, "shape": r.shape,
                "questions": [[q.question, q.answer] for q in r.questions]} for r in drawn]
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "rendered": records}))
    tmp.replace(manifest)  # last: a run cut off while drawing re-draws everything
    return records


def write_data(work: Path, views: int = VIEWS, rendered: int = RENDERED, limit: int | None = None,
               repeat: dict[str, int] | None = None) -> dict[str, Path]:
    """Train-split annotation files over work/images/: captions.jsonl (stage 1) and stage2.jsonl (questions,
    captions, chat), for the easy-VQA train images (the first `limit`, for a smoke test), `views` augmented
    views of each and `rendered` images of our own. `repeat` maps a colour to how many times the stage-2
    records of its images are written (1 for the others); the images and captions.jsonl stay as they are."""
    repeat = repeat or {}
    work.mkdir(parents=True, exist_ok=True)
    labels = easy_vqa.image_labels("train")
    if limit is not None:
        labels = {i: labels[i] for i in sorted(labels)[:limit]}
    texts = easy_vqa.all_caption_texts()
    asked: dict[int, list[tuple[str, str]]] = {}
    paths: dict[int, Path] = {}
    for q in easy_vqa.questions("train"):
        if q.image_id in labels:
            asked.setdefault(q.image_id, []).append((q.question, q.answer))
            paths[q.image_id] = Path(q.image)
    root = work / "images"
    drawn = _write_images(root, labels, paths, views, rendered)
    # (image, colour, shape, its questions) for every image file training sees.
    images = []
    for image_id, (colour, shape) in sorted(labels.items()):
        images.append((f"easy-vqa/{paths[image_id].name}", colour, shape, asked.get(image_id, [])))
        images += [(f"augmented/{image_id}-{k}.png", colour, shape, asked.get(image_id, []))
                   for k in range(views)]
    images += [(r["image"], r["colour"], r["shape"], [tuple(qa) for qa in r["questions"]]) for r in drawn]
    captions = work / "captions.jsonl"
    with captions.open("w") as f:
        for name, colour, shape, _ in images:
            text = easy_vqa.caption_text(colour, shape)
            f.write(json.dumps({"image": name, "text": text, "image_id": texts.index(text)}) + "\n")
    stage2 = work / "stage2.jsonl"
    rng = random.Random(0)
    with stage2.open("w") as f:
        for name, colour, shape, qas in images:
            # An empty question = a caption record.
            records = [{"image": name, "question": question, "answers": [answer]} for question, answer in qas]
            records.append({"image": name, "question": "", "answers": [easy_vqa.caption_text(colour, shape)]})
            records += chat_records(name, colour, shape, rng)
            for _ in range(repeat.get(colour, 1)):
                f.writelines(json.dumps(record) + "\n" for record in records)
    return {"captions": captions, "stage2": stage2, "images": root}


def _cache_covers(cache: Path, captions: Path) -> bool:
    """Whether the feature cache at `cache` is finished and holds every image `captions` names."""
    index = cache / "index.json"
    if not index.is_file():
        return False
    keys = set(json.loads(index.read_text())["keys"])
    lines = captions.read_text().splitlines()
    return all(json.loads(line)["image"] in keys for line in lines if line.strip())


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


def _colour_repeat(text: str) -> tuple[str, int]:
    """`brown=3` -> ("brown", 3), for --repeat; argparse turns the ArgumentTypeError into a one-line usage error."""
    colour, _, count = text.partition("=")
    if colour not in easy_vqa.COLOURS or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected COLOUR=N with N >= 1 and COLOUR one of "
                                         f"{', '.join(easy_vqa.COLOURS)}")
    return colour, int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2.recipes.default_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/default", help="working folder (data, cache, runs)")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its latest checkpoint")
    parser.add_argument("--skip-export", action="store_true", help="do not copy the result into the package")
    parser.add_argument("--only", choices=["data", "cache", "stage1", "stage2", "refit", "export"], default=None,
                        help="run one step of the pipeline (the earlier ones' outputs must exist)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for the feature cache and every stage")
    parser.add_argument("--views", type=int, default=VIEWS,
                        help=f"augmented views per easy-VQA image (default {VIEWS})")
    parser.add_argument("--rendered", type=int, default=RENDERED,
                        help=f"images of our own renderer added to the training data (default {RENDERED})")
    parser.add_argument("--limit-images", type=int, default=None, metavar="N",
                        help="only the first N easy-VQA train images (a quick trial of the pipeline)")
    parser.add_argument("--start-from", metavar="default|DIR", default=None,
                        help="skip stage 1 and continue stage 2 from this stage-2 model (the shipped one: default)")
    parser.add_argument("--repeat", nargs="*", default=[], metavar="COLOUR=N", type=_colour_repeat,
                        help="write the stage-2 records of this colour's images N times (e.g. brown=3)")
    parser.add_argument("--instructions", action="store_true",
                        help="stage 2 as instruction tuning: several templates per task, drawn per sample")
    for stage in ("stage1", "stage2", "refit"):
        parser.add_argument(f"--{stage}", nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"config overrides for {stage} (e.g. batch_size=64 lr=2e-4)")
    args = parser.parse_args(argv)

    from blip2.recipes import run_recipe

    work = Path(args.work)
    resume = ["--resume"] if args.resume else []
    files = write_data(work, args.views, args.rendered, args.limit_images, dict(args.repeat))
    cache = work / "features-train"
    if args.only in (None, "cache") and not _cache_covers(cache, files["captions"]):
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
    start_from = None
    if args.start_from is not None:
        start_from = PACKAGE_DEFAULT if args.start_from == "default" else Path(args.start_from)
        if not (start_from / "config.json").is_file():
            parser.error(f"--start-from {args.start_from}: no model folder (config.json) there")
        stages = stages[1:]  # stage 1 is what the started-from model already went through
    for name, recipe, config, data, start in stages:
        if args.only not in (None, name):
            continue
        init = [f"init_from={work / start / 'final'}"] if start else []
        if name == "stage2" and start_from is not None:
            init = [f"init_from={start_from}", "language=null"]  # the LLM comes with the model
        if name == "stage2" and args.instructions:  # the switch of configs/instruct_stage2.yaml
            init += ["instructions=true", "prompt=null", "data.max_text_len=48"]
        code = run_recipe(recipe, ["--config", str(CONFIGS / config), *resume, *common, f"data.path={data}", *init,
                                   f"output_dir={work / name}", *getattr(args, name)])
        if code:
            return code
    if args.only in (None, "export") and not args.skip_export:
        print(f"default model exported to {export(work / 'refit' / 'final')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
