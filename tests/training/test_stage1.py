"""The stage-1 recipe end to end on a tiny model: train, checkpoint, export, load; over-fit; exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import blip2
import tiny_models as tm
from conftest import losses_close, save_tiny_checkpoint, without_dropout, write_images, write_pairs
from blip2.data.datasets import DatasetError
from blip2.recipes import run_recipe
from blip2.recipes import stage1
from blip2.recipes.stage1 import Stage1Config, main, run
from blip2.training.config import ConfigError
from blip2.training.loop import seed_everything
from blip2.training import checkpoint as ckpt
from blip2.training.metrics import read_metrics
from blip2.training.options import DataConfig


def config(tmp_path, tokenizers, **kw) -> Stage1Config:
    data = kw.pop("data", None) or DataConfig(path=str(write_pairs(tmp_path, 8)))
    base = dict(output_dir=str(tmp_path / "run"), model=tm.our_config(None).to_dict(),
                qformer_tokenizer=str(tokenizers["bert"]), data=data, steps=4, batch_size=4, lr=1e-3,
                warmup_steps=1, log_every=1, progress=False)
    return Stage1Config(**{**base, **kw})


def test_stage1_end_to_end(tmp_path, tokenizers):
    cfg = config(tmp_path, tokenizers, save_every=2, keep_last=1)
    (tmp_path / "images" / "005.png").write_bytes(b"\x89PNG broken")  # one corrupt image among 8
    result = run(cfg)

    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.skipped_images == 2  # 4 steps x 4 = two epochs over 8 items: the bad one met twice
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "itc", "itm", "itg", "lr", "samples_per_s", "skipped_images"} <= set(records[0])
    assert records[-1]["skipped_images"] == 2
    assert records[0]["lr"] == pytest.approx(1e-6) and records[1]["lr"] == pytest.approx(1e-3)  # warmup, then peak
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000004"]

    # The export is a checkpoint `blip2.load` reads, holding the trained weights.
    model = blip2.load(result.final_dir)
    weights, state = ckpt.load_checkpoint(result.checkpoint)
    trained = model.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in weights.items())
    assert state["step"] == 4 and state["micro_batches"] == 4
    probs = model.itm(str(tmp_path / "images" / "000.png"), ["a red circle", "a blue square"])
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)
    assert model.similarity([str(tmp_path / "images" / "000.png")], ["a red circle"]).shape == (1, 1)


def test_stage1_overfits_one_batch(tmp_path, tokenizers):
    """Four pairs, no dropout, no augmentation. ITC and ITG keep a floor from their label smoothing (about 0.35
    and 0.73 here); ITM and ITC first sit on a plateau while the tiny random tower's features separate, so
    this takes a few hundred steps (~0.17 of the initial loss at step 300 for several seeds)."""
    rows = [{"image": rel, "text": f"a {c} {s}"} for rel, c, s in write_images(tmp_path, 4)]
    (tmp_path / "four.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, tokenizers, model=without_dropout(tm.our_config(None)).to_dict(),
                 data=DataConfig(path=str(tmp_path / "four.jsonl"), augment=False), steps=300, lr=5e-3,
                 min_lr=5e-3, warmup_steps=0, log_every=10, export=False, plot=False)
    result = run(cfg)
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    print(f"stage-1 over-fit: {first:.3f} -> {last:.3f}")
    assert last < 0.3 * first
    for part in ("itc", "itm", "itg"):
        assert sum(result.parts[part][-10:]) / 10 < 0.7 * result.parts[part][0], part


def test_stage1_resume_continues_exactly(tmp_path, tokenizers):
    """Stop after 3 of 6 steps mid-epoch (gradient accumulation, augmentation, dropout, two captions per
    image all on), resume: the losses and weights equal an uninterrupted run's."""
    pairs = write_pairs(tmp_path, 8)
    common = dict(data=DataConfig(path=str(pairs)), steps=6, batch_size=2, grad_accum=2, warmup_steps=2,
                  save_every=0, plot=False)
    full = run(config(tmp_path, tokenizers, output_dir=str(tmp_path / "full"), **common))
    part = run(config(tmp_path, tokenizers, output_dir=str(tmp_path / "split"), stop_after=3, **common))
    assert part.final_dir is None and part.checkpoint.name == "step_000003"
    rest = run(config(tmp_path, tokenizers, output_dir=str(tmp_path / "split"), resume="latest", **common))

    assert rest.first_step == 3 and len(rest.losses) == 3
    assert losses_close(part.losses + rest.losses, full.losses, 1e-6), (part.losses + rest.losses, full.losses)
    for name in ("itc", "itm", "itg"):
        assert losses_close(part.parts[name] + rest.parts[name], full.parts[name], 1e-6)
    a, _ = ckpt.load_checkpoint(full.checkpoint)
    b, _ = ckpt.load_checkpoint(rest.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_stage1_from_a_checkpoint_and_from_yaml(tmp_path, tokenizers):
    init = save_tiny_checkpoint(tmp_path / "init")
    pairs = write_pairs(tmp_path, 4)
    (tmp_path / "c.yaml").write_text(
        f"output_dir: {tmp_path / 'run'}\ninit_from: {init}\ndata:\n  path: {pairs}\nsteps: 2\nbatch_size: 2\n"
        "progress: false\n"
    )
    assert run_recipe("stage1", ["--config", str(tmp_path / "c.yaml"), "lr=1e-3"]) == 0  # tokenizer from init_from
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert main(["--config", str(tmp_path / "c.yaml"), "--resume"]) == 0  # already done: exports again


def test_stage1_errors_are_one_line(tmp_path, tokenizers, capsys):
    pairs = write_pairs(tmp_path, 4)
    for p in (tmp_path / "images").iterdir():
        p.write_bytes(b"")
    cfg = config(tmp_path, tokenizers, data=DataConfig(path=str(pairs)))
    with pytest.raises(DatasetError, match="none of its 4 images can be read"):
        run(cfg)
    assert main([f"output_dir={tmp_path / 'r'}", f"data.path={tmp_path / 'missing.jsonl'}",
                 f"qformer_tokenizer={tokenizers['bert']}", "model.num_query_tokens=2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blip2 train stage1: error:") and err.count("\n") == 1
    assert main([f"init_from={tmp_path}", "model.num_query_tokens=2"]) == 1  # both: which one?
    assert "exactly one of" in capsys.readouterr().err


def test_stage1_bf16_workers_tensorboard_clipping(tmp_path, tokenizers):
    cfg = config(tmp_path, tokenizers, steps=2, precision="bf16", grad_clip=1.0, tensorboard=True, cpu_threads=1,
                 data=DataConfig(path=str(write_pairs(tmp_path, 8)), num_workers=1))
    result = run(cfg)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert "grad_norm" in read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_stage1_reads_the_feature_cache(tmp_path):
    """Training from cached frozen features equals training from pixels with the eval transform (fp16
    storage aside): the same losses within float16 rounding."""
    import json

    from blip2.recipes import stage1
    from blip2.training.config import parse_args
    from blip2.recipes.cache_features import cache_features

    names = []
    for i, im in enumerate(tm.images(4, size=30)):
        im.save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": n, "text": t}) + "\n" for n, t in
                                                  zip(names, ["a red circle", "a blue square", "two cats", "a dog"])))
    tok = tmp_path / "tok"
    tm.word_tokenizer("bert").save_pretrained(tok)
    base = [f"model={json.dumps(tm.our_config(None).to_dict())}", f"qformer_tokenizer={tok}",
            f"data.path={tmp_path / 'pairs.jsonl'}", "data.augment=false", "steps=3", "batch_size=4", "lr=1e-3",
            "progress=false", "plot=false", "save_every=0", "seed=0", "device=cpu"]
    plain = stage1.run(parse_args(stage1.Stage1Config, base + [f"output_dir={tmp_path / 'a'}"], prog="t"))
    from blip2.convert.checkpoint import load_model

    model, _ = load_model(tmp_path / "a" / "final")
    cache = cache_features(model, tmp_path, names, tmp_path / "cache", progress=False)
    cached = stage1.run(parse_args(stage1.Stage1Config, base + [f"output_dir={tmp_path / 'b'}", f"data.feature_cache={cache}"], prog="t"))
    assert len(plain.losses) == len(cached.losses) == 3
    for a, b in zip(plain.losses, cached.losses):
        assert abs(a - b) < 1e-2


def test_stage1_trains_an_unfrozen_vit_with_checkpointing(tmp_path, tokenizers):
    """`trainable` may name vision layers (LAVIS freeze_vit=False); grad_checkpointing then also recomputes
    the ViT's layers. A feature cache cannot feed a tower that trains: a clear error before compute."""
    last = f"vision_model.encoder.layers.{tm.our_config(None).vision.hf_config['num_hidden_layers'] - 1}."
    trainable = ["qformer", "query_tokens", "vision_projection", "text_projection", "itm_head", "temp",
                 "qformer_lm_head", "vision_model.post_layernorm", last]
    cfg = config(tmp_path, tokenizers, trainable=trainable, grad_checkpointing=True, steps=2, export=False, plot=False)
    seed_everything(cfg.seed)  # as the recipe does before it builds the model: the same initial weights
    model, _ = stage1.build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(last)}
    result = run(cfg)
    assert len(result.losses) == 2
    weights, _ = ckpt.load_checkpoint(result.checkpoint)
    assert set(before) <= set(weights) and any(not torch.equal(weights[k], v) for k, v in before.items())
    frozen = "vision_model.encoder.layers.0."  # not in `trainable`: not saved, so untouched
    assert not any(k.startswith(frozen) for k in weights)
    cfg = dataclasses.replace(cfg, data=DataConfig(path=cfg.data.path, feature_cache=str(tmp_path / "cache")))
    with pytest.raises(ConfigError, match="data.feature_cache skips it"):
        run(cfg)
