"""Loading that never holds the model twice (issue 13, item 1): each tensor read alone, cast as read, placed
where it belongs; the LLM on a device map (accelerate's sense) or in 8/4-bit.

Exactness: per-tensor casting gives bit-identical weights to the old load-then-cast (safetensors' own reader,
then `cast`), for inline and `pretrained` LLMs, sharded and not; a device-mapped LLM (CPU + disk offload here:
this machine has no GPU) generates the same tokens as the plain load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tiny_models as tm
from blip2.convert import loading
from blip2.convert.checkpoint import build_model, cast, init_model, load_model, save_model
from blip2.convert.hf import config_from_hf
from blip2.models.config import LanguageConfig

DTYPES = [torch.float16, torch.bfloat16]


def _shard(src: Path, dst: Path) -> Path:
    """The same checkpoint as several shards with an index (transformers' own sharded writer)."""
    from transformers import Blip2ForConditionalGeneration

    Blip2ForConditionalGeneration.from_pretrained(src).save_pretrained(dst, max_shard_size="40KB")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    out = {}
    for kind in ("opt", "t5"):
        tm.save_generation_model(root / kind, kind, seed=5)
        out[(kind, False)] = root / kind
        out[(kind, True)] = _shard(root / kind, root / f"{kind}-sharded")
    assert len(list(out[("opt", True)].glob("*.safetensors"))) > 2
    return out


def _load_then_cast(folder: Path, dtype: torch.dtype | None):
    """The previous loader: every tensor read by safetensors as stored, the model built, then cast whole."""
    index = folder / loading.WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [loading.WEIGHTS]
    state = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), pre)
    return cast(build_model(cfg, state), dtype)


def _assert_bit_identical(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        bits = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731 - bitwise, not ==
        assert torch.equal(bits(a[key]), bits(b[key])), key


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_tensor_cast_is_bit_identical_to_load_then_cast(folders, kind, sharded, dtype):
    folder = folders[(kind, sharded)]
    ours, _ = load_model(folder, dtype=dtype)
    _assert_bit_identical(ours, _load_then_cast(folder, dtype))
    assert ours.query_tokens.dtype == torch.float32 and ours.qformer.layernorm.weight.dtype == torch.float32
    assert next(ours.language_model.parameters()).dtype == dtype


def test_small_chunks_and_a_half_precision_checkpoint(folders, tmp_path, monkeypatch):
    """Tensors bigger than a chunk are read in pieces; an fp16 checkpoint loads as float32 (dtype None) and
    keeps its stored dtype outside the low-precision parts (what `cast` does), bit for bit."""
    from transformers import Blip2ForConditionalGeneration

    monkeypatch.setattr(loading, "CHUNK_BYTES", 100)  # not a multiple of 4 or 2: pieces end mid-row
    half = tmp_path / "half"
    Blip2ForConditionalGeneration.from_pretrained(folders[("opt", False)]).half().save_pretrained(half)
    for f in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders[("opt", False)] / f, half / f)
    for dtype in (None, torch.bfloat16, torch.float16):
        _assert_bit_identical(load_model(half, dtype=dtype)[0], _load_then_cast(half, dtype))
    _assert_bit_identical(load_model(folders[("opt", True)], dtype=torch.bfloat16)[0],
                          _load_then_cast(folders[("opt", True)], torch.bfloat16))


def test_pretrained_llm_loads_in_the_dtype_bit_identical(tmp_path):
    """An LLM referenced by `pretrained` comes through from_pretrained(dtype=...) = from_pretrained().to()."""
    llm_folder = tmp_path / "llm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tm.text_config("llama")).save_pretrained(llm_folder)
    cfg = tm.our_config("llama")
    cfg = dataclasses.replace(cfg, language=LanguageConfig(hf_config=cfg.language.hf_config, pretrained=str(llm_folder)))
    save_model(init_model(cfg), tmp_path / "ours")
    for dtype in DTYPES:
        ours, _ = load_model(tmp_path / "ours", dtype=dtype)
        ref = cast(load_model(tmp_path / "ours", dtype=torch.float32)[0], dtype)
        _assert_bit_identical(ours, ref)
        assert next(ours.language_model.parameters()).dtype == dtype


def test_a_truncated_or_foreign_file_is_named(folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folders[("opt", False)], bad)
    weights = bad / loading.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors is truncated: tensor .* ends past the end of the file"):
        load_model(bad)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        load_model(bad)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_threaded_readers_give_the_one_reader_state_dict(folders, kind, monkeypatch):
    """Several reader threads (each its own buffer, chunks small enough that every tensor takes many reads)
    give the same keys, in the same file order, with the same dtypes and bits as one reader."""
    monkeypatch.setattr(loading, "CHUNK_BYTES", 100)
    folder = folders[(kind, True)]
    for rule in (None, loading.cast_rule(torch.bfloat16), loading.cast_rule(torch.float16)):
        one = list(loading.iter_tensors(folder, rule, threads=1))
        for threads in (2, 4):
            many = list(loading.iter_tensors(folder, rule, threads=threads))
            assert [k for k, _ in many] == [k for k, _ in one]
            for (key, a), (_, b) in zip(many, one):
                assert a.dtype == b.dtype and a.shape == b.shape, key
                assert torch.equal(_bits(a), _bits(b)), key
    assert {t.dtype for _, t in one} >= {torch.float16, torch.float32}  # casts and direct reads both ran


def test_threaded_readers_name_a_truncated_shard_and_stop(folders, tmp_path):
    """A shard cut short fails with the file and tensor named, from the thread that met the end, and a
    consumer that stops early leaves no reader running."""
    bad = tmp_path / "bad"
    shutil.copytree(folders[("opt", True)], bad)
    index = json.loads((bad / loading.WEIGHTS_INDEX).read_text())["weight_map"]
    shard = bad / sorted(set(index.values()))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(loading.CheckpointFileError, match=f"{shard.name} is truncated: tensor .* ends past the end"):
        loading.read_state(bad, loading.cast_rule(torch.bfloat16), threads=3)
    with pytest.raises(ValueError, match=f"{shard.name} is truncated"):
        load_model(bad, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="threads=0: loading needs at least one reader thread"):
        loading.read_state(bad, threads=0)
    import threading

    reading = loading.iter_tensors(folders[("opt", True)], threads=3)
    next(reading)
    reading.close()  # the generator's cleanup waits for the started reads and drops the rest
    assert not [t for t in threading.enumerate() if t.name.startswith("blip2-read")]


# -- the LLM on a device map ---------------------------------------------------------------------------------
def _tokens(model, beams: int) -> torch.Tensor:
    """Greedy or beam tokens for a batch of two images with left-padded prompts of different lengths."""
    from blip2.inference.pipeline import _load_tokenizer

    tok = _load_tokenizer(model.folder)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    prompt = tok(["a photo of", "what color is the circle ?"], return_tensors="pt", padding=True)
    pixels = torch.stack([torch.rand(3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, generator=torch.Generator().manual_seed(i))
                          for i in range(2)]).to(next(model.vision_model.parameters()).dtype)
    feats = model.encode_image(pixels)
    gen = dict(num_beams=beams, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return model.generate(feats, prompt["input_ids"], prompt["attention_mask"], **gen).cpu()


def _load(folder: Path, **kw):
    model, _ = load_model(folder, **kw)
    model.folder = folder
    return model


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_device_map_with_cpu_and_disk_offload_gives_the_same_tokens(folders, kind, tmp_path):
    folder = folders[(kind, True)]
    plain = _load(folder, dtype=torch.bfloat16)
    if kind == "opt":
        split = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                 "model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk",
                 "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu"}
    else:
        split = {"shared": "cpu", "encoder": "disk", "decoder": "cpu", "lm_head": "cpu"}
    mapped = _load(folder, dtype=torch.bfloat16, device_map=split, offload_folder=tmp_path / "offload")
    assert mapped.language_model.hf_device_map == split
    assert any(p.is_meta for p in mapped.language_model.parameters())  # disk weights load per forward
    assert mapped.query_tokens.device.type == "cpu" and mapped.query_tokens.dtype == torch.float32
    for beams in (1, 3):
        assert torch.equal(_tokens(mapped, beams), _tokens(plain, beams))


def test_auto_device_map_resolves_here_and_max_memory_pushes_layers_to_disk(folders, tmp_path):
    folder = folders[("opt", False)]
    plain = _load(folder, dtype=torch.bfloat16)
    auto = _load(folder, dtype=torch.bfloat16, device_map="auto")  # no GPU: all of it on the CPU
    _assert_bit_identical(auto, plain)
    tight = _load(folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": 12_000},
                  offload_folder=tmp_path / "offload")
    assert "disk" in tight.language_model.hf_device_map.values()
    assert torch.equal(_tokens(tight, 1), _tokens(plain, 1))


def test_device_map_for_a_pretrained_llm(tmp_path):
    llm_folder = tmp_path / "llm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tm.text_config("opt")).save_pretrained(llm_folder)
    cfg = tm.our_config("opt")
    cfg = dataclasses.replace(cfg, language=LanguageConfig(hf_config=cfg.language.hf_config, pretrained=str(llm_folder)))
    save_model(init_model(cfg), tmp_path / "ours", tokenizer=tm.word_tokenizer("opt"))
    plain = _load(tmp_path / "ours")
    split = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",  # tied to lm_head
             "model.decoder.layers": "disk", "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu"}
    mapped = _load(tmp_path / "ours", device_map=split, offload_folder=tmp_path / "offload")
    assert mapped.language_model.hf_device_map == split
    assert torch.equal(_tokens(mapped, 1), _tokens(plain, 1))


# -- 8-bit / 4-bit: CUDA and bitsandbytes only; here, the errors ------------------------------------------------
def test_quantize_needs_cuda_and_says_so(folders):
    import blip2

    folder = folders[("opt", False)]
    with pytest.raises(ValueError, match=r"quantize='8bit' needs a CUDA GPU \(bitsandbytes\)"):
        blip2.load(folder, quantize="8bit")
    with pytest.raises(ValueError, match="quantize='3bit' is not one of 8bit, 4bit"):
        blip2.load(folder, quantize="3bit")


def test_quantize_without_bitsandbytes_or_on_a_cpu_device_says_what_is_needed(monkeypatch):
    import importlib.util

    from blip2.models.language import check_quantize

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    with pytest.raises(ValueError, match="runs on CUDA only; device='cpu'"):
        check_quantize("4bit", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        check_quantize("4bit", None)


def test_quantization_config_is_transformers_bitsandbytes_config():
    from blip2.models.language import quantization_config

    eight = quantization_config("8bit", torch.bfloat16)
    four = quantization_config("4bit", torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16


def test_device_map_on_a_retrieval_checkpoint_is_a_clear_error(tmp_path):
    tm.save_retrieval_model(tmp_path / "itm")
    with pytest.raises(ValueError, match="place the language model, and .* has none"):
        load_model(tmp_path / "itm", device_map="auto")


def test_cli_quantize_on_cpu_and_a_bad_device_map_are_one_line(folders, tmp_path, capsys):
    from blip2 import cli

    tm.images(1)[0].save(tmp_path / "a.png")
    model = str(folders[("opt", False)])
    for flags, needle in [(["--quantize", "4bit"], "needs a CUDA GPU"), (["--device-map", "everywhere"], "--device-map")]:
        code = cli.main(["caption", str(tmp_path / "a.png"), "-m", model, "--device", "cpu", *flags])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code != 0 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_cli_device_map_loads(folders, tmp_path, capsys):
    from blip2 import cli

    tm.images(1)[0].save(tmp_path / "a.png")
    argv = ["caption", str(tmp_path / "a.png"), "-m", str(folders[("opt", False)]), "--device", "cpu", "--json"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    assert cli.main([*argv, "--device-map", '{"": "cpu"}', "--max-memory", "cpu=1GiB"]) == 0
    assert capsys.readouterr().out == plain
