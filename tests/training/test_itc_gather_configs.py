"""Stage 1 trains ITC with LAVIS's no-grad gather unless asked otherwise: REFERENCE §5's recipes were tuned with
it, and open_clip's gather-with-grad roughly doubles the ITC gradient (README, Distributed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2.recipes.stage1 import Stage1Config
from blip2.training.config import load_config, read_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGE1_CONFIGS = ["stage1.yaml", "pretrain_vitg_stage1.yaml", "default_stage1.yaml", "default_refit.yaml",
                  "finetune_retrieval.yaml"]


def test_the_recipe_default_is_the_no_grad_gather():
    assert Stage1Config().gather_grad is False


@pytest.mark.parametrize("name", STAGE1_CONFIGS)
def test_stage1_configs_choose_the_no_grad_gather_explicitly(name):
    assert read_yaml(CONFIGS / name).get("gather_grad") is False  # written in the file, not left to the default
    assert load_config(Stage1Config, CONFIGS / name).gather_grad is False
