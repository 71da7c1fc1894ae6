"""LoRA on the frozen LLM (models/language/lora.py, the stage-2 recipe's `lora.*`): our adapter forward equals
peft's on the same weights; only the adapters and the bridge train; checkpoints hold the adapters in peft's
format and resume exactly; `blip2.load` applies them; a merged export gives the adapter model's logits; the
QLoRA setting fails clearly where it cannot run."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import blip2
import tiny_models as tm
from conftest import losses_close, save_tiny_checkpoint, write_images, write_pairs
from blip2.convert.checkpoint import load_model
from blip2.models.blip2 import Blip2Model
from blip2.models.language import lora
from blip2.recipes.stage2 import Stage2Config, main, run
from blip2.training import checkpoint as ckpt
from blip2.training.options import DataConfig, LoraOptions

peft = pytest.importorskip("peft")


def lm_inputs(model: Blip2Model, kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(2, 4, model.config.language.hidden_size, generator=g)  # a soft prompt (B, Q, H)
    ids = torch.randint(5, tm.VOCAB - 1, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    extra = {"decoder_input_ids": ids[:, :3]} if kind == "t5" else {}
    return prefix, ids, mask, extra


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
def test_our_lora_forward_equals_peft(tmp_path, kind):
    """Adapters injected by us into Blip2Model's LLM, saved in peft's format, read by peft's own
    PeftModel.from_pretrained over a copy of the same LLM: the same logits on the same soft prompt and text."""
    torch.manual_seed(0)
    model = Blip2Model(tm.our_config(kind)).eval()
    plain = copy.deepcopy(model.language_model)
    config = lora.lora_config(model.language_model, r=4, alpha=8, dropout=0.0)
    assert sorted(config.target_modules) == (["q", "v"] if kind == "t5" else ["q_proj", "v_proj"])
    lora.add_adapters(model.language_model, config)
    with torch.no_grad():  # B starts at zero (a no-op adapter): give it weights so the test means something
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("language_model.")]
    assert trainable and all(lora.is_adapter_param(n) for n in trainable)
    folder = lora.save_adapters(model.language_model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs_model = peft.PeftModel.from_pretrained(plain, str(folder)).eval()

    prefix, ids, mask, extra = lm_inputs(model, kind)
    with torch.no_grad():
        ours = model.lm.logits(prefix, ids, mask, **extra)
        embeds = torch.cat([prefix, plain.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], dim=1)
        theirs = theirs_model(inputs_embeds=embeds, attention_mask=full_mask, **extra).logits
        base = lora.adapters_detached(model.language_model)
        with base:
            without = model.lm.logits(prefix, ids, mask, **extra)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
    assert (ours - without).abs().max() > 1e-3  # the adapters change the output
    assert lora.has_adapters(model.language_model)  # and come back after `adapters_detached`


def test_lora_targets_and_settings_errors():
    model = Blip2Model(tm.our_config("opt"))
    with pytest.raises(lora.LoraError, match=r"lora.targets \['nope'\]"):
        lora.lora_config(model.language_model, 4, 8, 0.0, ["nope"])
    with pytest.raises(lora.LoraError, match="lora.r must be at least 1"):
        lora.lora_config(model.language_model, 0, 8, 0.0)
    # QLoRA (lora.quantize=4bit): refused clearly where bitsandbytes' 4-bit layers cannot train
    import dataclasses

    from blip2.recipes.stage2 import quantized_llm
    from blip2.training.config import ConfigError

    qlora = Stage2Config(lora=LoraOptions(r=4, quantize="4bit"))
    with pytest.raises(ConfigError, match=r"QLoRA\) needs a CUDA GPU \(device=cpu\)"):
        quantized_llm(model, qlora, torch.device("cpu"))
    lang = dataclasses.replace(model.config.language, pretrained="folder", gguf_file="llm.gguf")
    model.config = dataclasses.replace(model.config, language=lang)
    with pytest.raises(ConfigError, match="GGUF files are dequantized"):
        quantized_llm(model, qlora, torch.device("cuda"))


# ------------------------------------------------------------------------------------------ the recipe


@pytest.fixture(scope="module")
def stage2_init(tmp_path_factory):
    """A tiny stage-2 OPT checkpoint whose frozen LLM is far from uniform (so an adapter can move it)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("lora_init") / "ckpt", "opt", llm_std=0.5, dropout=False)


def config(tmp_path, init, **kw) -> Stage2Config:
    base = dict(output_dir=str(tmp_path / "run"), init_from=str(init), steps=5, batch_size=2, grad_accum=2, lr=3e-3,
                warmup_steps=2, log_every=1, save_every=0, progress=False, plot=False,
                data=DataConfig(path=str(write_pairs(tmp_path, 8))), lora=LoraOptions(r=4, alpha=8, dropout=0.1))
    return Stage2Config(**{**base, **kw})


def test_lora_resume_is_exact_and_checkpoints_hold_peft_adapters(tmp_path, stage2_init):
    """A run cut at step 3 and resumed gives the losses and adapter weights of an uninterrupted run (LoRA dropout
    on: its random state is part of the checkpoint); the checkpoint keeps the bridge in trainable.safetensors
    and the adapters in peft's format under adapter/, both under the manifest."""
    full = run(config(tmp_path, stage2_init, output_dir=str(tmp_path / "full"), export=False))
    part = run(config(tmp_path, stage2_init, output_dir=str(tmp_path / "split"), stop_after=3, export=False))
    saved = part.checkpoint
    assert sorted(p.name for p in (saved / lora.ADAPTER_DIR).iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    bridge = load_file(str(saved / ckpt.WEIGHTS))
    assert "language_projection.weight" in bridge and not any(lora.is_adapter_param(k) for k in bridge)
    assert not any(k.startswith("language_model.") for k in bridge)  # the frozen LLM is not stored
    manifest = json.loads((saved / ckpt.MANIFEST).read_text())["files"]
    assert "adapter/adapter_model.safetensors" in manifest and ckpt.verify_checkpoint(saved) is None
    rest = run(config(tmp_path, stage2_init, output_dir=str(tmp_path / "split"), resume=str(saved), export=False))
    assert rest.first_step == 3 and len(rest.losses) == 2
    assert losses_close(part.losses + rest.losses, full.losses, 1e-6), (part.losses + rest.losses, full.losses)
    a = load_file(str(full.checkpoint / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS))
    b = load_file(str(rest.checkpoint / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # the adapters trained

    # A damaged adapter file is caught by the manifest, so resume=latest falls back to the older checkpoint.
    weights = rest.checkpoint / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in ckpt.verify_checkpoint(rest.checkpoint)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_load_applies_adapters_and_merged_export_is_equal(tmp_path, stage2_init, kind):
    """final/ with the adapters beside the bridge: `blip2.load` merges them into the LLM and gives the adapter
    model's logits; `lora.merge` writes the merged LLM instead, loads without peft's layers, same logits."""
    if kind == "t5":
        stage2_init = save_tiny_checkpoint(tmp_path / "t5", "t5", llm_std=0.2, dropout=False)
    common = dict(steps=4, warmup_steps=0)
    adapters = run(config(tmp_path, stage2_init, output_dir=str(tmp_path / "adapters"), **common)).final_dir
    merged = run(config(tmp_path, stage2_init, output_dir=str(tmp_path / "merged"), **common,
                        lora=LoraOptions(r=4, alpha=8, dropout=0.1, merge=True))).final_dir
    assert (adapters / "adapter" / "adapter_config.json").is_file() and not (merged / "adapter").exists()
    assert peft.LoraConfig.from_pretrained(str(adapters / "adapter")).r == 4

    # The adapter model, as trained: the bridge and the LLM from the folder, adapters injected, not merged.
    bare = tmp_path / "bare"
    shutil.copytree(adapters, bare, ignore=shutil.ignore_patterns("adapter"))
    reference, _ = load_model(bare)
    without = copy.deepcopy(reference)
    lora.load_adapters(reference.language_model, adapters / "adapter")
    loaded, _ = load_model(adapters)
    from_merged, _ = load_model(merged)
    assert not lora.has_adapters(loaded.language_model) and not lora.has_adapters(from_merged.language_model)

    prefix, ids, mask, extra = lm_inputs(reference, kind)
    models = (reference, loaded, from_merged, without)
    with torch.no_grad():
        want, got_loaded, got_merged, base = (m.lm.logits(prefix, ids, mask, **extra) for m in models)
        # The same forward in float64 over the stored float32 weights: what is left is the merge itself
        # (W + alpha/r B A rounded once to float32), not float32's summation noise on logits of size ~10.
        want64, loaded64, merged64, _ = (m.double().lm.logits(prefix.double(), ids, mask, **extra) for m in models)
    assert (want - base).abs().max() > 1e-3  # the adapters learned something
    scale = want.abs().max()
    print(f"merged vs adapter logits (|logit| <= {scale:.2f}): float32 {(got_merged - want).abs().max():.2e}, "
          f"float64 forward {(merged64 - want64).abs().max():.2e}; loaded {(got_loaded - want).abs().max():.2e}")
    for got, got64 in ((got_loaded, loaded64), (got_merged, merged64)):
        assert (got - want).abs().max() <= 1e-5 * scale, (got - want).abs().max()
        assert torch.allclose(got64, want64, atol=1e-5, rtol=0), (got64 - want64).abs().max()
    for m in models:
        m.float()
    image = str(tmp_path / "images" / "000.png")
    a = blip2.load(adapters).caption(image, num_beams=1, max_new_tokens=4)
    assert a == blip2.load(merged).caption(image, num_beams=1, max_new_tokens=4)


def test_lora_config_errors(tmp_path, stage2_init, capsys):
    def fails(*overrides: str) -> str:
        args = [f"init_from={stage2_init}", f"data.path={write_pairs(tmp_path, 4)}", f"output_dir={tmp_path / 'r'}",
                "steps=1", "batch_size=2", "progress=false", *overrides]
        assert main(args) == 1
        return capsys.readouterr().err

    assert "lora.quantize and lora.merge need adapters" in fails("lora.quantize=4bit")
    # QLoRA reads the LLM from language.pretrained; this tiny LLM is stored in the checkpoint
    assert "lora.quantize: 4bit needs an LLM read from `language.pretrained`" in fails("lora.r=4", "lora.quantize=4bit")
    assert "lora.targets ['k_nope']" in fails("lora.r=4", "lora.targets=[k_nope]")
    assert "lora.quantize must be one of" in fails("lora.r=4", "lora.quantize=2bit")
    first = run(config(tmp_path, stage2_init, output_dir=str(tmp_path / "plain"), steps=1, warmup_steps=0, export=False,
                       lora=LoraOptions()))
    assert "holds no LoRA adapters" in fails(f"output_dir={tmp_path / 'plain'}", f"resume={first.checkpoint}",
                                             "lora.r=4", "steps=2")


def test_lora_learns_faster_than_the_bridge_alone(tmp_path, stage2_init):
    """Over-fitting 8 captions: the same run, seed and lr, with rank-8 adapters on q_proj/v_proj and without.
    Measured (README "Training"): mean loss of steps 46-50 0.91 with LoRA vs 1.81 bridge-only, from 5.93;
    the assert keeps a wide margin."""
    rows = [{"image": rel, "text": f"a {c} {s}"} for rel, c, s in write_images(tmp_path, 8)]
    (tmp_path / "eight.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for name, opts in (("bridge", LoraOptions()), ("lora", LoraOptions(r=8, alpha=16, dropout=0.0))):
        cfg = config(tmp_path, stage2_init, output_dir=str(tmp_path / name), steps=40, batch_size=8, grad_accum=1,
                     warmup_steps=0, min_lr=3e-3, log_every=10, export=False, lora=opts,
                     data=DataConfig(path=str(tmp_path / "eight.jsonl"), augment=False))
        losses[name] = run(cfg).losses
    assert losses["lora"][0] == pytest.approx(losses["bridge"][0])  # B = 0: the same model at step 1
    end = {name: sum(v[-5:]) / 5 for name, v in losses.items()}
    print(f"loss after 40 steps: LoRA {end['lora']:.3f}, bridge only {end['bridge']:.3f}")
    assert end["lora"] < 0.75 * end["bridge"], end


def test_lora_in_the_caption_finetune_from_a_transformers_checkpoint(tmp_path):
    """`blip2 train caption lora.r=4` on a transformers Blip2ForConditionalGeneration folder (LLM stored inline,
    like Salesforce/blip2-opt-2.7b): the export stores the unchanged LLM plus the adapters; loading merges them."""
    from blip2.recipes import run_recipe
    from test_finetune import write_coco

    hf = tmp_path / "hf"
    tm.save_generation_model(hf, "opt")
    out = tmp_path / "caption"
    assert run_recipe("caption", [f"output_dir={out}", f"init_from={hf}", f"data.path={write_coco(tmp_path)}",
                                  "steps=2", "batch_size=4", "warmup_steps=0", "lr=1e-2", "save_every=0",
                                  "device=cpu", "progress=false", "plot=false", "lora.r=4", "lora.targets=[q_proj]"]) == 0
    assert peft.LoraConfig.from_pretrained(str(out / "final" / "adapter")).target_modules == {"q_proj"}
    start, _ = load_model(hf)
    stored = load_file(str(out / "final" / "model.safetensors"))
    llm = [k for k in stored if k.startswith("language_model.")]
    assert llm and all(torch.equal(stored[k], start.state_dict()[k]) for k in llm)  # the frozen LLM, unchanged
    loaded, _ = load_model(out / "final")
    key = "language_model.model.decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded.state_dict()[key], start.state_dict()[key])  # merged in at load
    assert torch.equal(loaded.state_dict()[key.replace("q_proj", "k_proj")], start.state_dict()[key.replace("q_proj", "k_proj")])


@pytest.mark.slow
def test_lora_two_processes_equal_one_process(tmp_path):
    """DDP (2 gloo processes, batch 2 each) with adapters trains as one process on batch 4: same losses, and the
    same adapters and bridge at the end (adapter dropout off: its draws differ between the two layouts)."""
    from test_ddp import _torchrun

    from blip2.training.config import load_config
    from blip2.training.metrics import read_metrics

    init = save_tiny_checkpoint(tmp_path / "init", "opt", llm_std=0.5, dropout=False)
    rows = [{"image": rel, "text": f"a {c} {s}"} for rel, c, s in write_images(tmp_path, 8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"init_from": str(init), "data": {"path": str(tmp_path / "pairs.jsonl")}, "steps": 3, "lr": 1e-3,
              "grad_clip": 1e9, "log_every": 1, "progress": False, "plot": False, "device": "cpu",
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    one = run(load_config(Stage2Config, path, [f"output_dir={tmp_path / 'one'}", "batch_size=4"]))
    _torchrun("blip2.recipes.stage2", path, f"output_dir={tmp_path / 'two'}", "batch_size=2")
    two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert two == pytest.approx(one.losses, rel=1e-5, abs=1e-5)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "final" / name)), load_file(str(tmp_path / "two" / "final" / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
        assert worst < 1e-5, (name, worst)
