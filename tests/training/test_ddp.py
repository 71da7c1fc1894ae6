"""Two processes under torchrun (gloo, 127.0.0.1) train exactly as one process on the same global batch.

Why it can be exact: the sampler gives rank r the r-th slice of each global batch and every item's
augmentation is seeded by (seed, epoch, index); DDP averages the ranks' mean losses, which equals the global
mean. For ITC that holds with either gather: with gradient (open_clip) the gather's backward returns each rank
the other ranks' terms' gradients of its rows; without (LAVIS) each rank's image->text term over its own images
against all texts trains only its image side, exactly as those rows of the one-process loss do, and likewise
text->image. Two things must be made comparable:
- dropout draws differ between one and two processes: the model runs without dropout here;
- ITM hard negatives are drawn per rank from that rank's rows. With a global batch of 2 (one pair per
  rank) every sample has exactly one non-matching item, so the draw is forced and the same in both runs.
  With larger batches the draws are equally distributed but not identical, so only ITC+ITG would match.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import tiny_models as tm
from conftest import save_tiny_checkpoint, without_dropout, write_images, write_pairs
from blip2.recipes import stage2
from blip2.recipes.stage1 import Stage1Config, run
from blip2.training.config import load_config
from blip2.training.metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(module: str, config, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", module, "--config", str(config), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _max_difference(a_folder, b_folder, skip: str = "^$") -> float:
    a, b = load_file(a_folder / "model.safetensors"), load_file(b_folder / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a if not re.search(skip, k))


@pytest.mark.slow
@pytest.mark.parametrize("gather_grad", [False, True])
def test_stage1_two_processes_equal_one_process(tmp_path, tokenizers, gather_grad):
    pairs = write_pairs(tmp_path, 8)
    model = json.loads(json.dumps(without_dropout(tm.our_config(None)).to_dict()))
    # At the 0.02 init every pair's ITC features are nearly equal, so each side's ITC gradient is a difference
    # of nearly equal terms: rounding dominates it and Adam, blind to scale, turns that into weight changes.
    model["qformer"]["initializer_range"] = model["vision"]["hf_config"]["initializer_range"] = 0.2
    config = {
        "model": model,
        "qformer_tokenizer": str(tokenizers["bert"]), "data": {"path": str(pairs)},
        "steps": 3, "lr": 1e-3, "warmup_steps": 1, "grad_clip": 1e9,  # a clip that never clips logs the grad norm
        "log_every": 1, "progress": False, "plot": False, "device": "cpu", "gather_grad": gather_grad,
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    one = run(load_config(Stage1Config, path, [f"output_dir={tmp_path / 'one'}", "batch_size=2"]))
    _torchrun("blip2.recipes.stage1", path, f"output_dir={tmp_path / 'two'}", "batch_size=1")

    records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    expected = read_metrics(tmp_path / "one" / "metrics.jsonl")
    for key in ("loss", "itc", "itm", "itg", "grad_norm"):
        got, want = [r[key] for r in records], [r[key] for r in expected]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), key
    assert [r["loss"] for r in expected] == pytest.approx(one.losses, rel=1e-7)
    # A key bias adds the same q·b to all of a query's scores, which softmax ignores: its true gradient is 0,
    # and Adam scales the rounding left in its place up to lr-sized steps that differ between the two runs.
    worst = _max_difference(tmp_path / "one" / "final", tmp_path / "two" / "final", skip=r"\.key\.bias$")
    print(f"stage 1 (gather_grad={gather_grad}), DDP vs one process: worst weight difference {worst:.2e}")
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_stage2_two_processes_equal_one_process(tmp_path, tokenizers):
    """The LM loss is a mean over each rank's target tokens: equal to the global mean when every rank holds
    as many target tokens, as here (same-length captions)."""
    init = save_tiny_checkpoint(tmp_path / "init", dropout=False)
    rows = [{"image": rel, "text": f"a {c} {s}"} for rel, c, s in write_images(tmp_path, 8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "init_from": str(init), "language": json.loads(json.dumps(tm.our_config("opt").to_dict()["language"])),
        "tokenizer": str(tokenizers["opt"]), "data": {"path": str(tmp_path / "pairs.jsonl")},
        "steps": 3, "lr": 1e-3, "grad_clip": 1e9, "log_every": 1, "progress": False, "plot": False, "device": "cpu",
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    one = stage2.run(load_config(stage2.Stage2Config, path, [f"output_dir={tmp_path / 'one'}", "batch_size=4"]))
    _torchrun("blip2.recipes.stage2", path, f"output_dir={tmp_path / 'two'}", "batch_size=2")
    records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["loss"] for r in records] == pytest.approx(one.losses, rel=1e-5, abs=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")], rel=1e-5, abs=1e-5)
    worst = _max_difference(tmp_path / "one" / "final", tmp_path / "two" / "final")
    print(f"stage 2, DDP vs one process: worst weight difference {worst:.2e}")
    assert worst < 1e-5, worst
