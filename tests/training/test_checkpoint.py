"""Training checkpoints: atomic folders, the last K kept, exact RNG and weight round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from blip2.training import checkpoint as ckpt


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((2, 3), value), "b": torch.tensor(value)}


def test_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, _weights(step), {"micro_batches": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000040"
    weights, state = ckpt.load_checkpoint(tmp_path / "step_000040")
    assert torch.equal(weights["a.weight"], torch.full((2, 3), 40.0)) and state == {"micro_batches": 40, "step": 40}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_failed_write_leaves_the_old_checkpoints(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _weights(1), {}, keep_last=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, _weights(2), {}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # neither step 2 nor its temp folder
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"


def test_half_written_folders_are_not_checkpoints(tmp_path):
    (tmp_path / "step_000050").mkdir()
    (tmp_path / "step_000050" / ckpt.WEIGHTS).write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "step_000050")


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, _weights(1), {}, keep_last=3)
    ckpt.save_checkpoint(tmp_path, 5, _weights(2), {}, keep_last=3)
    weights, _ = ckpt.load_checkpoint(tmp_path / "step_000005")
    assert float(weights["b"]) == 2.0 and len(list(tmp_path.iterdir())) == 1


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint(tmp_path, 1, _weights(0), {"rng": [ckpt.rng_state({"g": gen})]})
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.rand((), generator=gen)))  # noqa: E731
    expected = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    _, state = ckpt.load_checkpoint(tmp_path / "step_000001")  # weights_only=True load
    ckpt.set_rng_state(state["rng"][0], {"g": gen})
    assert draw() == expected


def test_load_trainable_is_strict():
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    ckpt.load_trainable(model, {"weight": torch.ones(2, 2)})
    assert torch.equal(model.weight, torch.ones(2, 2))
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_trainable(model, {})
    with pytest.raises(ValueError, match="unexpected"):
        ckpt.load_trainable(model, {"weight": torch.ones(2, 2), "bias": torch.ones(2)})
