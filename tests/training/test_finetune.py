"""The paper's fine-tunes (caption, vqa, retrieval) through `run_recipe` with their default configs, on tiny
models: a few steps end to end from a checkpoint (a transformers one for caption/VQA), checkpoint, export,
load with `blip2.load`, generate / score. Also: configs layer (`--config` twice) and the shipped files parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import blip2
import tiny_models as tm
from conftest import save_tiny_checkpoint, write_images, write_vqa
from blip2.recipes import FINETUNES, default_config, run_recipe
from blip2.recipes.stage1 import Stage1Config
from blip2.recipes.stage2 import Stage2Config
from blip2.training import checkpoint as ckpt
from blip2.training.config import load_config, parse_args
from blip2.training.metrics import read_metrics

# Small and quick; everything else (lr 1e-5, betas, prompt, data format) comes from the fine-tune's file.
QUICK = ["steps=3", "batch_size=4", "warmup_steps=1", "log_every=1", "save_every=0", "precision=fp32",
         "device=cpu", "progress=false", "plot=false"]


def write_coco(folder: Path, n: int = 4, name: str = "captions.json") -> Path:
    """COCO caption annotations: n images, two captions each (sharing the image's id)."""
    images, annotations = [], []
    for i, (rel, c, s) in enumerate(write_images(folder, n)):
        images.append({"id": 100 + i, "file_name": rel})
        annotations += [{"image_id": 100 + i, "id": 2 * i, "caption": f"a {c} {s}."},
                        {"image_id": 100 + i, "id": 2 * i + 1, "caption": f"a photo of a {c} {s}"}]
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def finetune(name: str, tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / name
    assert run_recipe(name, [f"output_dir={out}", *QUICK, *overrides]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_000003"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    assert records[0]["lr"] == pytest.approx(1e-8) and records[1]["lr"] == pytest.approx(1e-5)  # the file's warmup_lr, lr
    return out


def saved_config(out: Path) -> dict:
    _, state = ckpt.load_checkpoint(out / "checkpoints" / "step_000003")
    return state["config"]


@pytest.fixture(scope="module")
def hf_opt(tmp_path_factory) -> Path:
    """A published-style checkpoint: transformers' Blip2ForConditionalGeneration saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "blip2-opt"
    tm.save_generation_model(folder, "opt")
    return folder


def test_caption_finetune_from_a_transformers_checkpoint(tmp_path, hf_opt):
    data = write_coco(tmp_path)
    out = finetune("caption", tmp_path, f"init_from={hf_opt}", f"data.path={data}")
    cfg = saved_config(out)
    assert cfg["prompt"] == "a photo of" and cfg["betas"] == [0.9, 0.999] and cfg["weight_decay"] == 0.05
    assert cfg["data"]["format"] == "coco"

    # The export loads with blip2.load and captions; its Q-Former moved away from the starting checkpoint.
    model = blip2.load(out / "final")
    captions = model.caption([str(tmp_path / "images" / "000.png")], prompt="a photo of", num_beams=1, max_new_tokens=3)
    assert len(captions) == 1 and isinstance(captions[0], str)
    start = blip2.load(hf_opt).model.state_dict()
    trained = model.model.state_dict()
    assert not torch.equal(start["query_tokens"], trained["query_tokens"])
    assert torch.equal(start["language_model.model.decoder.embed_tokens.weight"],
                       trained["language_model.model.decoder.embed_tokens.weight"])  # the LLM stays frozen

    # ...and it is still a transformers checkpoint.
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(out / "final")
    assert torch.allclose(hf.query_tokens, trained["query_tokens"])


def test_vqa_finetune(tmp_path, hf_opt):
    data = write_vqa(tmp_path, 8)
    out = finetune("vqa", tmp_path, f"init_from={hf_opt}", "data.format=vqa", f"data.path={data}",
                   "data.annotations=null", "data.image_root=")
    assert saved_config(out)["prompt"] == "Question: {} Answer:"
    model = blip2.load(out / "final")
    answers = model.ask(str(tmp_path / "images" / "001.png"), ["what color is this ?", "what shape is this ?"],
                        template="Question: {} Answer:", num_beams=1, max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_vqa_finetune_with_the_question_in_the_qformer(tmp_path, tokenizers):
    """The paper's VQA fine-tune: from a stage-1 checkpoint plus an LLM, the queries also read the question."""
    import dataclasses

    stage1 = save_tiny_checkpoint(tmp_path / "stage1", seed=2)
    language = json.dumps(dataclasses.asdict(tm.our_config("opt").language))
    out = finetune("vqa", tmp_path, f"init_from={stage1}", f"language={language}", f"tokenizer={tokenizers['opt']}",
                   "question_to_qformer=true", "data.format=vqa", f"data.path={write_vqa(tmp_path, 8)}",
                   "data.annotations=null", "data.image_root=")
    model = blip2.load(out / "final")
    assert model.model.config.question_to_qformer
    answers = model.ask(str(tmp_path / "images" / "000.png"), ["what shape is this ?"], num_beams=1, max_new_tokens=2)
    assert len(answers) == 1


def test_retrieval_finetune(tmp_path):
    stage1 = save_tiny_checkpoint(tmp_path / "stage1", seed=3)
    data = write_coco(tmp_path)  # 4 images x 2 captions: a batch of 4 often holds both captions of an image
    out = finetune("retrieval", tmp_path, f"init_from={stage1}", f"data.path={data}")
    cfg = saved_config(out)
    assert cfg["use_image_ids"] and cfg["betas"] == [0.9, 0.999] and cfg["init_from"] == str(stage1)
    records = read_metrics(out / "metrics.jsonl")
    assert {"itc", "itm", "itg"} <= set(records[0])

    model = blip2.load(out / "final")
    images = [str(tmp_path / "images" / f"{i:03d}.png") for i in range(4)]
    probs = model.itm(images[0], ["a red circle", "a green circle"])
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)
    assert model.similarity(images, ["a red circle"]).shape == (4, 1)
    matches = model.retrieve("a red circle", images, k=2)
    assert len(matches) == 1 and len(matches[0]) == 2


def test_retrieval_finetune_from_a_transformers_retrieval_checkpoint(tmp_path):
    folder = tmp_path / "blip2-itm"
    tm.save_retrieval_model(folder)
    finetune("retrieval", tmp_path, f"init_from={folder}", f"data.path={write_coco(tmp_path)}")


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", sorted(FINETUNES))
def test_shipped_finetune_configs_parse(name):
    cls = Stage2Config if FINETUNES[name][0] == "stage2" else Stage1Config
    cfg = load_config(cls, default_config(name))
    assert cfg.lr == 1e-5 and cfg.warmup_steps == 1000 and cfg.betas == (0.9, 0.999) and cfg.weight_decay == 0.05
    assert cfg.init_from and cfg.data.path and cfg.steps > 0
    if name == "caption":
        assert cfg.prompt == "a photo of"
    if name == "vqa":
        assert cfg.prompt == "Question: {} Answer:"
    if name == "retrieval":
        assert cfg.use_image_ids


def test_config_files_layer(tmp_path):
    """A user's --config is layered over the fine-tune's: mappings merge key by key, later files win."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: {path: my.json, image_root: imgs}\nlr: 2.0e-5\n")
    cfg = parse_args(Stage2Config, ["--config", str(default_config("caption")), "--config", str(mine), "steps=7"], prog="t")
    assert cfg.data.path == "my.json" and cfg.data.image_root == "imgs" and cfg.data.format == "coco"  # merged
    assert cfg.lr == 2e-5 and cfg.steps == 7 and cfg.prompt == "a photo of" and cfg.betas == (0.9, 0.999)


def test_cli_train_finetune_prints_its_config(capsys):
    from blip2 import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["train", "caption", "--print-config", "steps=5"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "prompt: a photo of" in out and "steps: 5" in out and "lr: 1.0e-05" in out
