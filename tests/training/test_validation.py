"""Validation during training (blip2.eval.validation): logged at `val.every` and at the end, equal to scoring
the exported model afterwards, without disturbing training; bad settings fail before compute."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import blip2
import tiny_models as tm
from conftest import losses_close, save_tiny_checkpoint, write_pairs, write_vqa
from blip2.eval.validation import Validator
from blip2.recipes import stage1, stage2
from blip2.training.config import ConfigError
from blip2.training.metrics import read_metrics
from blip2.training.options import DataConfig, ValConfig


@pytest.fixture(scope="module")
def stage1_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("stage1") / "ckpt", seed=1)


def stage2_config(tmp_path, stage1_folder, tokenizers, **kw) -> stage2.Stage2Config:
    vqa = write_vqa(tmp_path, 8)
    base = dict(output_dir=str(tmp_path / "run"), init_from=str(stage1_folder),
                language=dataclasses.asdict(tm.our_config("opt").language), tokenizer=str(tokenizers["opt"]),
                data=DataConfig(format="vqa", path=str(vqa)), steps=4, batch_size=4, lr=1e-3, log_every=1,
                progress=False, plot=False)
    return stage2.Stage2Config(**{**base, **kw})


def test_stage2_validates_vqa_every_n_steps_without_disturbing_training(tmp_path, stage1_folder, tokenizers):
    val = ValConfig(task="vqa", data=str(tmp_path / "vqa.jsonl"), every=2, limit=6, batch_size=4)
    with_val = stage2.run(stage2_config(tmp_path, stage1_folder, tokenizers, val=val))
    without = stage2.run(stage2_config(tmp_path, stage1_folder, tokenizers, output_dir=str(tmp_path / "plain")))
    # Validation switches to eval mode and back: dropout is on again, so training is unchanged.
    assert losses_close(with_val.losses, without.losses, 0.0), (with_val.losses, without.losses)

    assert [v["step"] for v in with_val.validation] == [2, 4]
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_vqa_accuracy" in r]
    assert [(r["step"], r["val_vqa_accuracy"]) for r in logged] == [(v["step"], v["val_vqa_accuracy"])
                                                                     for v in with_val.validation]
    # The last validation is the exported model's score on the same questions.
    model = blip2.load(with_val.final_dir)
    again = Validator.load("vqa", str(tmp_path / "vqa.jsonl"), limit=6, batch_size=4)(
        model.model, model.tokenizer, model.qformer_tokenizer)
    assert again == {"val_vqa_accuracy": with_val.validation[-1]["val_vqa_accuracy"]}


def test_stage2_validates_captions(tmp_path, stage1_folder, tokenizers):
    pairs = write_pairs(tmp_path, 4)
    cfg = stage2_config(tmp_path, stage1_folder, tokenizers, data=DataConfig(path=str(pairs)), steps=2,
                        val=ValConfig(task="caption", data=str(pairs)))
    result = stage2.run(cfg)
    assert [v["step"] for v in result.validation] == [2]  # every=0: at the end only
    assert set(result.validation[0]) == {"step", "val_bleu4", "val_cider"}
    assert all(v >= 0 for v in result.validation[0].values())


def test_stage1_validates_retrieval(tmp_path, tokenizers):
    pairs = write_pairs(tmp_path, 8)
    cfg = stage1.Stage1Config(output_dir=str(tmp_path / "run"), model=tm.our_config(None).to_dict(),
                              qformer_tokenizer=str(tokenizers["bert"]), data=DataConfig(path=str(pairs)),
                              steps=3, batch_size=4, lr=1e-3, log_every=1, progress=False, plot=False,
                              val=ValConfig(task="retrieval", data=str(pairs), every=1))
    result = stage1.run(cfg)
    assert [v["step"] for v in result.validation] == [1, 2, 3]
    model = blip2.load(result.final_dir)
    again = Validator.load("retrieval", str(pairs))(model.model, None, model.qformer_tokenizer)
    assert again == {k: v for k, v in result.validation[-1].items() if k != "step"}
    assert all(0 <= v <= 100 for v in again.values())


def test_bad_validation_settings_fail_before_compute(tmp_path, stage1_folder, tokenizers, capsys):
    pairs = write_pairs(tmp_path, 4)
    common = [f"output_dir={tmp_path / 'r'}", f"data.path={pairs}", f"init_from={stage1_folder}", "progress=false",
              "batch_size=4"]
    assert stage1.main([*common, "val.task=vqa", f"val.data={pairs}"]) == 1
    assert "val.task=vqa needs a model with an LLM" in capsys.readouterr().err
    assert stage1.main([*common, "val.task=retrieval", f"val.data={tmp_path / 'missing.jsonl'}"]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert stage1.main([*common, "val.task=retrieval"]) == 1
    assert "val.data is empty" in capsys.readouterr().err
    assert stage1.main([*common, "val.task=ocr", f"val.data={pairs}"]) == 1
    assert "val.task" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    assert stage1.main([*common, "batch_size=8"]) == 1  # a batch larger than the data: one line, no traceback
    assert "fewer than one global batch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs keys 'image', 'question' and 'answers'"):
        stage2.run(stage2_config(tmp_path, stage1_folder, tokenizers, val=ValConfig(task="vqa", data=str(pairs))))


def test_validation_data_reads_like_blip2_eval(tmp_path):
    rows = [{"image": "images/000.png", "question": "q?", "answers": "a"}]
    write_vqa(tmp_path, 1)
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    v = Validator.load("vqa", str(tmp_path / "one.jsonl"))
    assert len(v.data) == 1 and v.data[0].answers == ["a"]
    assert len(Validator.load("retrieval", "easy-vqa-retrieval:test", limit=5).data.images) == 5
