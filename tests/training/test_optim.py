"""AdamW groups and the warmup + cosine schedule (REFERENCE §5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tiny_models as tm
from blip2.models.blip2 import Blip2Model
from blip2.training.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups, warmup_cosine


def test_param_groups_decay_only_matrices_of_trainable_params():
    model = Blip2Model(tm.our_config(None))
    groups = param_groups(model.named_parameters(), 0.05)
    decay, plain = groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert "qformer.encoder.layer.0.attention.attention.query.weight" in decay["names"]
    assert "query_tokens" in decay["names"]  # (1, Q, D): decayed, as in LAVIS
    for name in ("temp", "qformer.layernorm.weight", "qformer.encoder.layer.0.attention.attention.query.bias",
                 "vision_model.post_layernorm.weight", "qformer_lm_head.bias"):
        assert name in plain["names"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay["names"]) | set(plain["names"]) == trainable
    assert not any(n.startswith("vision_model.encoder") for n in decay["names"] + plain["names"])
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_param_groups_need_something_to_train():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen.named_parameters(), 0.05)


def test_schedule_values():
    lr, total, warm = 1e-4, 100, 10
    assert warmup_cosine(0, lr, total, warm, min_lr=1e-5, warmup_start_lr=1e-6) == pytest.approx(1e-6)
    assert warmup_cosine(5, lr, total, warm, 1e-5, 1e-6) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert warmup_cosine(10, lr, total, warm, 1e-5) == pytest.approx(1e-4)  # peak right after warmup
    assert warmup_cosine(55, lr, total, warm, 1e-5) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5)  # halfway
    assert warmup_cosine(100, lr, total, warm, 1e-5) == pytest.approx(1e-5)
    assert warmup_cosine(500, lr, total, warm, 1e-5) == pytest.approx(1e-5)  # stays at the floor
    # no warmup: a plain cosine from the peak
    assert warmup_cosine(0, lr, total) == pytest.approx(lr)
    assert warmup_cosine(25, lr, total) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduler_follows_the_function_and_round_trips():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer(nn.ParameterList([p]), lr=1e-3, weight_decay=0.05)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, min_lr=1e-4, warmup_start_lr=1e-5)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [warmup_cosine(s, 1e-3, 20, 5, 1e-4, 1e-5) for s in range(20)]
    assert seen == pytest.approx(expected, rel=1e-9)
    # the state (with the schedule object) survives torch.save / weights_only torch.load
    import io

    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["last_epoch"] == 20 and state["lr_lambdas"][0]["total_steps"] == 20


def test_schedule_rejects_nonsense():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(1e-4, total_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(1e-4, total_steps=0)
