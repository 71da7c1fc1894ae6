"""Training survives damaged checkpoints and kills at bad moments: a truncated or corrupted latest checkpoint
is passed over (with a warning) for the newest intact one, a run with none intact stops with one line, what a
killed write or deletion left behind is removed at the next start, and metrics.jsonl is never half rewritten.
The kills are real: a child process is stopped with SIGKILL while a patched hook holds it at the bad
moment."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from conftest import losses_close, write_pairs
from blip2.recipes import stage1
from blip2.training import checkpoint as ckpt
from blip2.training.metrics import MetricsLogger, read_metrics
from blip2.training.options import DataConfig


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((16, 16), value), "b": torch.tensor(value)}


def _run_dir(tmp_path: Path, steps=(1, 2)) -> Path:
    """output_dir with checkpoints at `steps` (all kept)."""
    for step in steps:
        ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", step, _weights(step), {"micro_batches": step},
                             keep_last=0)
    return tmp_path / "run"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the data, past every header: the size stays right
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (ckpt.WEIGHTS, _truncate, "truncated"),
    "truncated state": (ckpt.STATE, _truncate, "truncated"),
    "flipped byte in the weights": (ckpt.WEIGHTS, _flip, "sha256"),
    "flipped byte in the state": (ckpt.STATE, _flip, "sha256"),
    "truncated manifest": (ckpt.MANIFEST, _truncate, "manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    name, harm, reason = DAMAGE[damage]
    out = _run_dir(tmp_path)
    harm(out / "checkpoints" / "step_000002" / name)
    with caplog.at_level(logging.WARNING, logger="blip2.train"):
        folder = ckpt.resume_folder("latest", out)
    assert folder.name == "step_000001"
    messages = [r.getMessage() for r in caplog.records]
    assert any("step_000002" in m and reason in m for m in messages), messages
    weights, state = ckpt.load_checkpoint(folder)
    assert float(weights["b"]) == 1.0 and state["step"] == 1
    # listing checks sizes only (a flipped byte needs the hash, read when resuming)
    cheap = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert cheap == (["step_000001", "step_000002"] if reason == "sha256" else ["step_000001"])


def test_no_intact_checkpoint_is_one_clear_error(tmp_path, capsys):
    out = _run_dir(tmp_path)
    _truncate(out / "checkpoints" / "step_000001" / ckpt.STATE)
    _flip(out / "checkpoints" / "step_000002" / ckpt.WEIGHTS)
    with pytest.raises(ckpt.CheckpointDamagedError, match="none of the 2 checkpoint.s. .* is intact") as err:
        ckpt.resume_folder("latest", out)
    assert "step_000002: trainable.safetensors does not match" in str(err.value)
    assert "step_000001: state.pt has" in str(err.value)
    with pytest.raises(ckpt.CheckpointDamagedError, match="not an intact training checkpoint .*sha256"):
        ckpt.resume_folder(str(out / "checkpoints" / "step_000002"), out)  # named by hand: no fallback

    # The recipe says so in one line, before building anything.
    assert stage1.main([f"output_dir={out}", f"data.path={tmp_path / 'unused.jsonl'}", "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blip2 train stage1: error: resume=latest: none of the 2") and err.count("\n") == 1


def test_a_checkpoint_that_cannot_be_read_is_a_clear_error(tmp_path):
    out = _run_dir(tmp_path, (1,))
    _truncate(out / "checkpoints" / "step_000001" / ckpt.STATE)
    with pytest.raises(ckpt.CheckpointDamagedError, match="step_000001 cannot be read"):
        ckpt.load_checkpoint(out / "checkpoints" / "step_000001")  # loaded without verifying first


def test_checkpoints_from_before_manifests(tmp_path, caplog):
    """Written before this change: they still load; a truncated one is passed over; one whose state.pt has
    the right structure but does not load is passed over too (it is loaded before it is trusted)."""
    out = _run_dir(tmp_path, (1, 2, 3))
    for step in (1, 2, 3):
        (out / "checkpoints" / ckpt.checkpoint_name(step) / ckpt.MANIFEST).unlink()
    assert len(ckpt.list_checkpoints(out / "checkpoints")) == 3
    assert ckpt.resume_folder("latest", out).name == "step_000003"

    _truncate(out / "checkpoints" / "step_000003" / ckpt.WEIGHTS)
    state = out / "checkpoints" / "step_000002" / ckpt.STATE
    with zipfile.ZipFile(state) as z:  # torch.save's format: stored (uncompressed) zip members
        member = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(state.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len  # the pickle's first byte
    data[start + 2: start + 18] = b"\x00" * 16
    state.write_bytes(bytes(data))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_000001", "step_000002"]
    with caplog.at_level(logging.WARNING, logger="blip2.train"):
        assert ckpt.resume_folder("latest", out).name == "step_000001"
    assert "step_000003" in caplog.text and "step_000002" in caplog.text and "unreadable" in caplog.text


def test_pruning_never_counts_a_damaged_newer_folder(tmp_path):
    """Resumed from step 1 past a damaged step 2, the run saves step 2 again (replacing it) and step 3;
    keep_last=1 must keep the checkpoint just written, not the damaged one from the abandoned run."""
    out = _run_dir(tmp_path, (1, 2, 4))
    _flip(out / "checkpoints" / "step_000004" / ckpt.WEIGHTS)  # looks whole to a listing
    ckpt.save_checkpoint(out / "checkpoints", 3, _weights(3), {}, keep_last=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    assert ckpt.resume_folder("latest", out).name == "step_000003"


# ------------------------------------------------------------------------------------- real kills

CHILD = textwrap.dedent('''
    import os, shutil, sys, time
    from pathlib import Path

    out, moment = Path(sys.argv[1]), sys.argv[2]

    def hold(*args, **kwargs):
        (out / "ready").write_text(str(os.getpid()))
        time.sleep(600)

    if moment == "metrics":  # without torch: it takes seconds to import on a busy machine
        from blip2.training import metrics

        os.fsync = hold  # the new file written, not yet in place
        metrics.MetricsLogger(out, resume_step=2)
    else:
        import torch
        from blip2.training import checkpoint as ckpt

        weights = lambda v: {"a.weight": torch.full((256, 256), float(v)), "b": torch.tensor(float(v))}
        ckpt.save_checkpoint(out / "checkpoints", 1, weights(1), {"micro_batches": 1}, keep_last=1)
        if moment == "write":
            torch.save = hold  # the weights are written, state.pt is not
        elif moment == "delete":
            def rmtree(path, *args, **kwargs):
                os.remove(Path(path) / ckpt.STATE)  # half of the old checkpoint deleted
                hold()
            shutil.rmtree = rmtree
        ckpt.save_checkpoint(out / "checkpoints", 2, weights(2), {"micro_batches": 2}, keep_last=1)
    raise SystemExit("the hook never ran")
''')


def _kill_at(tmp_path: Path, moment: str) -> Path:
    """Run CHILD until it holds at `moment`, then SIGKILL it. Returns its output_dir."""
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(out), moment], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 180
    try:
        while not (out / "ready").exists():
            if proc.poll() is not None:
                pytest.fail(f"the child ended before the kill: {proc.stderr.read()}")
            assert time.monotonic() < deadline, "the child never reached the hook"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    (out / "ready").unlink()
    return out


def test_killed_inside_a_checkpoint_write(tmp_path):
    out = _kill_at(tmp_path, "write")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[0].startswith(".step_000002.tmp-") and names[1:] == ["step_000001"]  # the orphan

    folder = ckpt.resume_folder("latest", out)  # the next start
    assert folder.name == "step_000001" and float(ckpt.load_checkpoint(folder)[0]["b"]) == 1.0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]


def test_killed_while_deleting_an_old_checkpoint(tmp_path):
    out = _kill_at(tmp_path, "delete")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # never a `step_` folder with half its files
    assert names[0].startswith(".step_000001.trash-") and names[1:] == ["step_000002"]
    assert not (out / "checkpoints" / names[0] / ckpt.STATE).exists()

    folder = ckpt.resume_folder(None, out)  # a fresh start cleans up too
    assert folder is None and [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    assert ckpt.resume_folder("latest", out).name == "step_000002"


def test_killed_while_metrics_jsonl_is_rewritten(tmp_path):
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    out = _kill_at(tmp_path, "metrics")
    assert read_metrics(out / "metrics.jsonl") == history  # the whole old history, not a cut or empty file

    MetricsLogger(out, resume_step=3).close()  # the next start
    assert read_metrics(out / "metrics.jsonl") == history[:3]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # the killed rewrite's temp file too


# ---------------------------------------------------------------------------------------- end to end


def test_stage1_resumes_exactly_past_a_damaged_latest_checkpoint(tmp_path, tokenizers, caplog):
    """Checkpoints at steps 2 and 4, step 4's weights corrupted: the resumed run starts again from step 2
    and ends with exactly the uninterrupted run's losses, weights and metrics.jsonl."""
    common = dict(model=tm.our_config(None).to_dict(), qformer_tokenizer=str(tokenizers["bert"]),
                  data=DataConfig(path=str(write_pairs(tmp_path, 8))), steps=6, batch_size=2, lr=1e-3,
                  warmup_steps=2, log_every=1, save_every=2, keep_last=2, progress=False, plot=False,
                  export=False)
    full = stage1.run(stage1.Stage1Config(output_dir=str(tmp_path / "full"), **common))
    part = stage1.run(stage1.Stage1Config(output_dir=str(tmp_path / "split"), stop_after=4, **common))
    _flip(part.checkpoint / ckpt.WEIGHTS)
    (tmp_path / "split" / "checkpoints" / ".step_000006.tmp-1").mkdir()  # and a killed write's orphan
    with caplog.at_level(logging.WARNING, logger="blip2.train"):
        rest = stage1.run(stage1.Stage1Config(output_dir=str(tmp_path / "split"), resume="latest", **common))

    assert "skipping the damaged checkpoint" in caplog.text and "step_000004" in caplog.text
    assert rest.first_step == 2 and len(rest.losses) == 4
    assert losses_close(part.losses[:2] + rest.losses, full.losses, 1e-6), (part.losses, rest.losses,
                                                                            full.losses)
    a, _ = ckpt.load_checkpoint(full.checkpoint)
    b, _ = ckpt.load_checkpoint(rest.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    left = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert left == ["step_000004", "step_000006"]
    assert ckpt.verify_checkpoint(tmp_path / "split" / "checkpoints" / "step_000004") is None  # rewritten
