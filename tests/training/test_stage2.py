"""The stage-2 recipe end to end on tiny models (OPT and T5): from a stage-1 checkpoint, export, load and
generate; over-fit; exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import blip2
import tiny_models as tm
from conftest import losses_close, save_tiny_checkpoint, write_images, write_pairs, write_vqa
from blip2.convert.checkpoint import load_model
from blip2.recipes.stage2 import Stage2Config, build_model, main, run
from blip2.training import checkpoint as ckpt
from blip2.training.config import ConfigError
from blip2.training.metrics import read_metrics
from blip2.training.options import DataConfig


def language(kind: str) -> dict:
    return dataclasses.asdict(tm.our_config(kind).language)


@pytest.fixture(scope="module")
def stage1_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("stage1") / "ckpt", seed=1)


def config(tmp_path, **kw) -> Stage2Config:
    base = dict(output_dir=str(tmp_path / "run"), steps=3, batch_size=4, lr=1e-3, log_every=1, progress=False)
    if "data" not in kw:
        base["data"] = DataConfig(path=str(write_pairs(tmp_path, 8)))
    return Stage2Config(**{**base, **kw})


def test_stage2_takes_the_bridge_from_a_stage1_checkpoint(tmp_path, stage1_folder, tokenizers):
    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]))
    model, _ = build_model(cfg)
    stage1, _ = load_model(stage1_folder)
    s1, s2 = stage1.state_dict(), model.state_dict()
    taken = [k for k in s2 if k.startswith(("qformer.", "query_tokens", "vision_model."))]
    assert taken and all(torch.equal(s1[k], s2[k]) for k in taken)
    assert not hasattr(model, "embeddings") and not model.config.stage1_heads  # no Q-Former text side
    assert model.language_projection.weight.requires_grad
    assert not any(p.requires_grad for p in model.language_model.parameters())
    with pytest.raises(ConfigError, match="also give `language`"):
        build_model(config(tmp_path, init_from=str(stage1_folder)))


def test_stage2_opt_captions_end_to_end(tmp_path, stage1_folder, tokenizers):
    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]),
                 save_every=2)
    result = run(cfg)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    model = blip2.load(result.final_dir)
    weights, _ = ckpt.load_checkpoint(result.checkpoint)
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in weights.items())
    captions = model.caption([str(tmp_path / "images" / "000.png")], num_beams=1, max_new_tokens=4)
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_stage2_t5_vqa_end_to_end(tmp_path, stage1_folder, tokenizers):
    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("t5"), tokenizer=str(tokenizers["t5"]),
                 data=DataConfig(format="vqa", path=str(write_vqa(tmp_path, 8))), prompt="question : {} answer :")
    result = run(cfg)
    assert len(result.losses) == 3
    model = blip2.load(result.final_dir)
    answers = model.ask(str(tmp_path / "images" / "001.png"), ["what color is this ?"],
                        template="question : {} answer :", num_beams=1, max_new_tokens=3)
    assert len(answers) == 1
    # and T5 on captions without a prompt: the prefix-LM split
    cfg = config(tmp_path, init_from=str(result.final_dir), output_dir=str(tmp_path / "run2"), steps=2)
    assert len(run(cfg).losses) == 2


def test_stage2_overfits_one_batch(tmp_path, tokenizers):
    init = save_tiny_checkpoint(tmp_path / "init", "opt", llm_std=0.5, dropout=False)
    rows = [{"image": rel, "text": f"a {c} {s}"} for rel, c, s in write_images(tmp_path, 4)]
    (tmp_path / "four.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, init_from=str(init), data=DataConfig(path=str(tmp_path / "four.jsonl"), augment=False),
                 steps=250, lr=3e-3, min_lr=3e-3, log_every=10, plot=False)
    result = run(cfg)
    first, at_100, last = result.losses[0], sum(result.losses[90:100]) / 10, sum(result.losses[-10:]) / 10
    print(f"stage-2 over-fit: {first:.3f} -> {at_100:.3f} (step 100) -> {last:.3f} (step 250)")
    assert at_100 < 0.3 * first and last < 0.1 * first
    # The over-fitted model captions its training images with their captions.
    model = blip2.load(result.final_dir)
    got = model.caption([str(tmp_path / r["image"]) for r in rows], num_beams=1, max_new_tokens=5)
    assert sum(g == r["text"] for g, r in zip(got, rows)) >= 3, got


def test_stage2_resume_continues_exactly(tmp_path, stage1_folder, tokenizers):
    common = dict(init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]),
                  data=DataConfig(path=str(write_pairs(tmp_path, 8))), steps=5, batch_size=2, grad_accum=2,
                  warmup_steps=2, save_every=0, plot=False, export=False)
    full = run(config(tmp_path, output_dir=str(tmp_path / "full"), **common))
    part = run(config(tmp_path, output_dir=str(tmp_path / "split"), stop_after=3, **common))
    rest = run(config(tmp_path, output_dir=str(tmp_path / "split"), resume=str(part.checkpoint), **common))
    assert rest.first_step == 3 and len(rest.losses) == 2
    assert losses_close(part.losses + rest.losses, full.losses, 1e-6), (part.losses + rest.losses, full.losses)


def test_stage2_errors(tmp_path, stage1_folder, tokenizers, capsys):
    vqa = write_vqa(tmp_path, 4)
    assert main([f"init_from={stage1_folder}", f"data.path={vqa}", "data.format=vqa", "prompt=no placeholder",
                 f"output_dir={tmp_path / 'r'}"]) == 1
    assert "needs a prompt template with {}" in capsys.readouterr().err
    stage2 = save_tiny_checkpoint(tmp_path / "s2", "opt")
    assert main([f"init_from={stage2}", f"data.path={vqa}", "language.pretrained=x", f"output_dir={tmp_path / 'r'}"]) == 1
    assert "(a VQA file? use the vqa format)" in capsys.readouterr().err
    assert main([f"init_from={stage2}", f"data.path={vqa}", "data.format=vqa", "language.pretrained=x",
                 f"output_dir={tmp_path / 'r'}"]) == 1
    assert "already a stage-2 checkpoint" in capsys.readouterr().err


def test_stage2_fp16_with_accumulation(tmp_path, stage1_folder, tokenizers):
    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]),
                 precision="fp16", grad_accum=2, batch_size=2, steps=2, export=False, plot=False)
    result = run(cfg)  # loss scaling: the first steps may be skipped while the scale settles, never NaN
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_question_to_qformer_end_to_end(tmp_path, stage1_folder, tokenizers):
    """The question also goes to the Q-Former (REFERENCE §5 VQA fine-tune): trained that way, saved with both
    tokenizers, and at inference each question gets its own soft prompt while the image is encoded once."""
    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]),
                 data=DataConfig(format="vqa", path=str(write_vqa(tmp_path, 8))), question_to_qformer=True)
    result = run(cfg)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    model = blip2.load(result.final_dir)
    assert model.model.config.question_to_qformer and model.qformer_tokenizer is not None
    feats = model.encode_images([str(tmp_path / "images" / "001.png")])
    two = model.soft_prompts(feats.expand(2, -1, -1), ["what color is this ?", "what shape is this ?"])
    assert not torch.allclose(two[0], two[1])  # the queries read the question
    image = str(tmp_path / "images" / "001.png")
    questions = ["what color is this ?", "what shape is this ?"]
    batched = model.ask(image, questions, num_beams=1, max_new_tokens=3)
    assert batched == [model.ask(image, q, num_beams=1, max_new_tokens=3)[0] for q in questions]
    chat = model.chat(image, num_beams=1, max_new_tokens=3)
    assert chat.ask(questions[0]) == batched[0]
    assert len(model.caption(image, num_beams=1, max_new_tokens=3)) == 1


def test_stage1_refits_heads_of_a_stage2_model(tmp_path, stage1_folder, tokenizers):
    """After a stage 2 that moved the Q-Former, stage 1 re-fits only the ITC/ITM/ITG heads; the LLM side and
    both tokenizers survive, so the model both answers and matches."""
    from blip2.recipes import stage1

    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]),
                 data=DataConfig(format="vqa", path=str(write_vqa(tmp_path, 8))), question_to_qformer=True)
    stage2_dir = run(cfg).final_dir
    heads = ["vision_projection", "text_projection", "itm_head", "temp", "qformer_lm_head"]
    refit = stage1.Stage1Config(output_dir=str(tmp_path / "refit"), init_from=str(stage2_dir), trainable=heads,
                                steps=2, batch_size=4, lr=1e-3, progress=False,
                                data=DataConfig(path=str(write_pairs(tmp_path, 8))))
    result = stage1.run(refit)
    before, after = blip2.load(stage2_dir), blip2.load(result.final_dir)
    a, b = before.model.state_dict(), after.model.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(tuple(heads)) for k in changed)
    image = str(tmp_path / "images" / "001.png")
    assert after.ask(image, "what color is this ?", num_beams=1, max_new_tokens=3) == \
        before.ask(image, "what color is this ?", num_beams=1, max_new_tokens=3)
    assert len(after.itm(image, ["a red circle"])) == 1


def test_vqa_history_prompts_match_chat(tokenizers):
    """A training record with earlier turns reads exactly the prompt `Blip2.chat` builds for that turn."""
    from transformers import AutoTokenizer

    from blip2.data.text import chat_prompt
    from blip2.recipes.stage2 import text_batch

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["opt"])
    cfg = Stage2Config(prompt="Question: {} Answer:", data=DataConfig(max_text_len=40))
    batch = {"index": torch.tensor([0, 1, 2]), "question": ["what color is it?", "is it red?", ""],
             "answer": ["red", "yes", "a red circle"], "history": [[("what shape is this?", "circle")], [], []]}
    text = text_batch(batch, tokenizer, cfg, encoder_decoder=False, micro=0)
    expected = [chat_prompt([("what shape is this?", "circle")], "what color is it?"), "Question: is it red? Answer:", ""]
    assert expected[0] == "Question: what shape is this? Answer: circle. Question: what color is it? Answer:"
    for row, (prompt, target) in enumerate(zip(expected, [" red", " yes", "a red circle"])):
        ids = tokenizer(prompt)["input_ids"] + tokenizer(target, add_special_tokens=False)["input_ids"]
        assert text.input_ids[row, : len(ids)].tolist() == ids
        n_prompt = len(tokenizer(prompt)["input_ids"]) if prompt else 0
        assert (text.labels[row, :n_prompt] == -100).all() and (text.labels[row, n_prompt : len(ids)] != -100).all()


def test_vqa_prompts_follow_the_models_question_template(tokenizers):
    """An InstructBLIP model asks with the raw instruction ("{}"): training without a prompt builds the same LLM
    prompt `Blip2.ask` sends, not BLIP-2's "Question: {} Answer:"; an explicit prompt still wins."""
    from transformers import AutoTokenizer

    from blip2.recipes.stage2 import text_batch

    tokenizer = AutoTokenizer.from_pretrained(tokenizers["opt"])
    batch = {"index": torch.tensor([0]), "question": ["what color is it?"], "answer": ["red"]}
    ids = lambda prompt: tokenizer(prompt)["input_ids"]  # noqa: E731
    raw = text_batch(batch, tokenizer, Stage2Config(data=DataConfig(max_text_len=40)), False, 0,
                     question_template="{}")
    assert raw.input_ids[0, : len(ids("what color is it?"))].tolist() == ids("what color is it?")
    blip2_style = text_batch(batch, tokenizer, Stage2Config(data=DataConfig(max_text_len=40)), False, 0)
    assert blip2_style.input_ids[0, : len(ids("Question: what color is it? Answer:"))].tolist() == \
        ids("Question: what color is it? Answer:")
    explicit = text_batch(batch, tokenizer, Stage2Config(prompt="Q: {} A:", data=DataConfig(max_text_len=40)),
                          False, 0, question_template="{}")
    assert explicit.input_ids[0, : len(ids("Q: what color is it? A:"))].tolist() == ids("Q: what color is it? A:")


def test_the_qformer_reads_what_it_reads_at_inference():
    """question_to_qformer training feeds the Q-Former what `Blip2` feeds it: the question, else the caption prompt
    (fixed or drawn instruction), else ""."""
    from blip2.data.instructions import instruction_batch
    from blip2.recipes.stage2 import qformer_texts

    vqa = {"index": torch.tensor([0, 1]), "question": ["is it red?", ""], "answer": ["yes", "a red circle"]}
    assert qformer_texts(vqa, Stage2Config(prompt="Question: {} Answer:"), 0) == ["is it red?", ""]
    captions = {"index": torch.tensor([0, 1]), "text": ["a red circle", "a blue square"]}
    assert qformer_texts(captions, Stage2Config(prompt="a photo of"), 0) == ["a photo of", "a photo of"]
    assert qformer_texts(captions, Stage2Config(), 0) == ["", ""]
    cfg = Stage2Config(instructions=True, prompt=None)
    drawn = instruction_batch(vqa, cfg.seed, 5)[0]
    assert qformer_texts(vqa, cfg, 5) == ["is it red?", drawn[1]] and drawn[1]


def test_the_frozen_llm_in_half_precision(tmp_path, stage1_folder, tokenizers):
    """llm_dtype "auto" casts the frozen LLM to the autocast dtype on GPU, and only an LLM reloaded from
    `language.pretrained` (one stored in our checkpoints is never rounded unasked); bf16 asked for on CPU
    trains the bridge through a bf16 LLM and the export, which stores that LLM, loads and generates."""
    from blip2.recipes.stage2 import llm_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert llm_dtype(Stage2Config(precision="bf16"), cpu, reloaded=True) is None
    assert llm_dtype(Stage2Config(precision="bf16"), gpu, reloaded=True) is torch.bfloat16
    assert llm_dtype(Stage2Config(precision="fp16"), gpu, reloaded=True) is torch.float16
    assert llm_dtype(Stage2Config(precision="bf16"), gpu, reloaded=False) is None
    assert llm_dtype(Stage2Config(precision="bf16", llm_dtype="fp32"), gpu, reloaded=True) is None
    assert llm_dtype(Stage2Config(llm_dtype="bf16"), cpu, reloaded=False) is torch.bfloat16
    cfg = config(tmp_path, init_from=str(stage1_folder), language=language("opt"), tokenizer=str(tokenizers["opt"]),
                 precision="bf16", llm_dtype="bf16", steps=3, plot=False)
    model, _ = build_model(cfg)
    before = model.language_projection.weight.detach().clone()
    result = run(cfg)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    from blip2.convert.checkpoint import read_state_dict

    stored = read_state_dict(result.final_dir)
    llm = [v for k, v in stored.items() if k.startswith("language_model.") and v.is_floating_point()]
    assert llm and all(v.dtype == torch.bfloat16 for v in llm)  # asked for: the export stores the bf16 LLM
    assert stored["language_projection.weight"].dtype == torch.float32  # trainable parts stay fp32
    assert not torch.equal(stored["language_projection.weight"], before)
    captions = blip2.load(result.final_dir).caption([str(tmp_path / "images" / "000.png")], num_beams=1, max_new_tokens=3)
    assert len(captions) == 1
