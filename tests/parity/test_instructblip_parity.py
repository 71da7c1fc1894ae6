"""Parity with transformers' `InstructBlipForConditionalGeneration` on the same weights: tiny random
InstructBLIP checkpoints (OPT, Llama, Flan-T5-style LLMs; two query counts) saved to a folder, loaded by
`blip2.load` as `question_to_qformer` models, compared tensor by tensor and token by token; and back: what we
save loads in transformers' InstructBLIP class with the same tensors and logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import tiny_models as tm
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

import blip2
from blip2.convert.checkpoint import save_model
from blip2.convert.instructblip import instructblip_to_ours, ours_to_instructblip
from blip2.convert.keymap import KeyMapError
from blip2.models.blip2 import Blip2Model

ATOL = 1e-5
CASES = [  # (LLM, queries, cross-attention frequency, Q-Former layers)
    ("opt", 4, 2, 3),
    ("opt", 6, 1, 2),
    ("llama", 4, 1, 2),
    ("llama", 6, 2, 3),
    ("t5", 4, 2, 2),
    ("t5", 6, 1, 2),
]
INSTRUCTIONS = ["what color is the circle on this picture ?", "what shape is it ?", "a photo of"]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-q{c[1]}-x{c[2]}")
def pair(request, tmp_path_factory):
    kind, queries, cross, layers = request.param
    folder = tmp_path_factory.mktemp(f"instructblip-{kind}{queries}{cross}")
    hf = tm.save_instructblip_model(folder, kind, queries, cross, layers)
    return kind, hf, blip2.load(folder), folder


def _image_tokens(kind: str, hf, rows: int) -> torch.Tensor:
    # transformers' InstructBlipProcessor puts num_query_tokens image tokens before the (padded) prompt.
    return torch.full((rows, hf.config.num_query_tokens), tm.image_token_index(kind))


def _hf_inputs(kind: str, hf, ours, texts: list[str]) -> dict[str, torch.Tensor]:
    """What InstructBlipProcessor gives for `texts` (the same text for the Q-Former and the LLM); decoder-only
    LLM prompts left padded, as generation wants."""
    qf = ours.qformer_tokenizer(texts, return_tensors="pt", padding=True)
    side = ours.tokenizer.padding_side
    ours.tokenizer.padding_side = "right" if kind == "t5" else "left"
    llm = ours.tokenizer(texts, return_tensors="pt", padding=True)
    ours.tokenizer.padding_side = side
    ones = torch.ones(len(texts), hf.config.num_query_tokens, dtype=torch.long)
    return {
        "qformer_input_ids": qf["input_ids"], "qformer_attention_mask": qf["attention_mask"],
        "input_ids": torch.cat([_image_tokens(kind, hf, len(texts)), llm["input_ids"]], dim=1),
        "attention_mask": torch.cat([ones, llm["attention_mask"]], dim=1),
    }


def test_config_is_an_instruction_aware_blip2(pair):
    kind, hf, ours, _ = pair
    cfg = ours.model.config
    assert cfg.question_to_qformer and cfg.qformer.use_text_input and cfg.question_template == "{}"
    assert cfg.num_query_tokens == hf.config.num_query_tokens and cfg.language.is_encoder_decoder == (kind == "t5")
    assert ours.qformer_tokenizer is not None and ours.question_template == "{}"


def test_forward_matches(pair):
    """Q-Former outputs (the queries after reading image + instruction) and the LLM's logits, padded batch."""
    kind, hf, ours, _ = pair
    pixels = ours.images(tm.images(3))
    inputs = _hf_inputs(kind, hf, ours, INSTRUCTIONS)
    queries = hf.config.num_query_tokens
    kw = {"decoder_input_ids": torch.tensor([[0, 7, 8, 9]] * 3)} if kind == "t5" else {}
    with torch.no_grad():
        ref = hf(pixel_values=pixels, **inputs, **kw)
        feats = ours.model.encode_image(pixels)
        qtext = (inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
        hidden = ours.model.query_with_text(feats, *qtext)
        logits = ours.model.lm_logits(feats, inputs["input_ids"][:, queries:], inputs["attention_mask"][:, queries:],
                                      qformer_text=qtext, **kw)
    assert (feats - ref.vision_outputs.last_hidden_state).abs().max() <= ATOL
    assert (hidden - ref.qformer_outputs.last_hidden_state[:, :queries]).abs().max() <= ATOL
    assert logits.shape == ref.logits.shape
    real = inputs["attention_mask"].bool() if kind != "t5" else torch.ones(logits.shape[:2], dtype=torch.bool)
    assert (logits - ref.logits)[real].abs().max() <= ATOL  # every real position (left pads hold nothing)
    # The instruction matters: the queries read it (a different instruction, a different soft prompt).
    other = ours.soft_prompts(feats[:1], ["what shape is it ?"])
    assert (other - ours.soft_prompts(feats[:1], ["a photo of"])).abs().max() > 1e-3


@pytest.mark.parametrize("beams", [1, 4])
def test_generation_matches(pair, beams):
    """transformers' generate on the processor's inputs == ours, raw ids and through `ask` / `caption`."""
    kind, hf, ours, _ = pair
    images = tm.images(2, seed=1)
    pixels = ours.images(images)
    questions = ["what color is the circle on this picture ?", "what shape is it ?"]
    gen = {"max_new_tokens": 7, "min_new_tokens": 2, "num_beams": beams, "do_sample": False}
    inputs = _hf_inputs(kind, hf, ours, questions)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, **inputs, **gen)
    # transformers returns the prompt too for decoder-only LLMs, the decoder start token for T5.
    ref = ref[:, 1:] if kind == "t5" else ref[:, inputs["input_ids"].shape[1]:]
    expected = [t.strip() for t in ours.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    queries = hf.config.num_query_tokens
    with torch.no_grad():
        soft = ours.model.soft_prompt(ours.model.encode_image(pixels),
                                      (inputs["qformer_input_ids"], inputs["qformer_attention_mask"]))
        ids = ours.model.generate(input_ids=inputs["input_ids"][:, queries:],
                                  attention_mask=inputs["attention_mask"][:, queries:], soft_prompt=soft, **gen)
    assert torch.equal(ids, ref)
    settings = {**gen, "length_penalty": 1.0}
    assert ours.ask(images, questions, **settings) == expected  # the question is the instruction, untemplated
    # A caption prompt is the instruction too: the Q-Former and the LLM both read it.
    inputs = _hf_inputs(kind, hf, ours, ["a photo of"] * 2)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, **inputs, **gen)
    ref = ref[:, 1:] if kind == "t5" else ref[:, inputs["input_ids"].shape[1]:]
    expected = [t.strip() for t in ours.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    assert ours.caption(images, prompt="a photo of", **settings) == expected


def test_chat_first_turn_is_ask(pair):
    kind, _, ours, _ = pair
    image = tm.images(1, seed=4)[0]
    settings = {"num_beams": 1, "max_new_tokens": 5}
    session = ours.chat(image, **settings)
    assert session.ask("what color is it ?") == ours.ask(image, "what color is it ?", **settings)[0]


def test_saved_folder_loads_in_transformers(pair, tmp_path):
    """Ours -> InstructBLIP layout -> transformers: every tensor and the logits equal the original's."""
    kind, hf, ours, _ = pair
    out = save_model(ours.model, tmp_path / "saved", ours.tokenizer, ours.qformer_tokenizer)
    assert json.loads((out / "config.json").read_text())["model_type"] == "instructblip"
    assert (out / "qformer_tokenizer").is_dir()
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "InstructBlipProcessor"
    back = InstructBlipForConditionalGeneration.from_pretrained(out).eval()
    want, got = hf.state_dict(), back.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    pixels = ours.images(tm.images(2, seed=5))
    inputs = _hf_inputs(kind, hf, ours, INSTRUCTIONS[:2])
    kw = {"decoder_input_ids": torch.tensor([[0, 7, 8]] * 2)} if kind == "t5" else {}
    with torch.no_grad():
        assert torch.equal(hf(pixel_values=pixels, **inputs, **kw).logits, back(pixel_values=pixels, **inputs, **kw).logits)
    again = blip2.load(out)
    assert again.model.config == ours.model.config
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in ours.model.state_dict().items())


def test_our_question_to_qformer_model_is_instructblip(tmp_path):
    """A question_to_qformer model built here (no transformers origin) saves as an InstructBLIP checkpoint that
    transformers runs with the same logits: one mechanism, not two."""
    base = tm.our_config("llama", num_queries=5)
    cfg = dataclasses.replace(base, qformer=dataclasses.replace(base.qformer, use_text_input=True),
                              question_to_qformer=True, image_token_index=tm.image_token_index("llama"))
    torch.manual_seed(0)
    model = Blip2Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = save_model(model, tmp_path / "ours", tm.word_tokenizer("llama"), tm.word_tokenizer("bert"))
    hf = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    ours = blip2.load(folder)
    # Our config rides along in config.json: the template stays ours (None: BLIP-2's), not InstructBLIP's "{}".
    assert ours.model.config.question_to_qformer and ours.model.config.question_template is None
    assert ours.question_template == "Question: {} Answer:"
    pixels = ours.images(tm.images(2, seed=6))
    inputs = _hf_inputs("llama", hf, ours, INSTRUCTIONS[:2])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, **inputs).logits
        qtext = (inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
        logits = ours.model.lm_logits(ours.model.encode_image(pixels), inputs["input_ids"][:, 5:],
                                      inputs["attention_mask"][:, 5:], qformer_text=qtext)
    real = inputs["attention_mask"].bool()
    assert (logits - ref)[real].abs().max() <= ATOL


# ------------------------------------------------------------------------------------------ the key map


def _hf_state(kind: str = "opt", cross: int = 2) -> dict[str, torch.Tensor]:
    qformer = tm.qformer_config(3, cross).to_dict()
    qformer.pop("use_qformer_text_input")
    cfg = InstructBlipConfig(vision_config=tm.vision_config().to_dict(), qformer_config=qformer,
                             text_config=tm.text_config(kind).to_dict(), num_query_tokens=4)
    return InstructBlipForConditionalGeneration(cfg).state_dict()


def test_keymap_round_trip_is_exact():
    sd = _hf_state()
    ours = instructblip_to_ours(sd)
    assert "embeddings.word_embeddings.weight" in ours and "qformer.layernorm.weight" in ours
    assert not any(k.startswith("qformer.embeddings.") for k in ours)
    back = ours_to_instructblip(ours)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_keymap_is_strict():
    sd = _hf_state()
    with pytest.raises(KeyMapError, match="unexpected key") as err:
        instructblip_to_ours({**sd, "qformer.encoder.layer.0.attention.attention.extra.weight": torch.zeros(1)})
    assert err.value.unmatched == ["qformer.encoder.layer.0.attention.attention.extra.weight"]
    missing = {k: v for k, v in sd.items() if k != "qformer.encoder.layer.1.output.dense.weight"}
    with pytest.raises(KeyMapError, match="missing key") as err:
        instructblip_to_ours(missing)
    assert err.value.missing == ["qformer.encoder.layer.1.output.dense.weight"]
    # Cross-attention is all-or-none per layer: half a cross-attention block is missing keys.
    half = {k: v for k, v in sd.items() if k != "qformer.encoder.layer.0.crossattention.attention.key.bias"}
    with pytest.raises(KeyMapError, match="crossattention.attention.key.bias"):
        instructblip_to_ours(half)
    # A BLIP-2-style Q-Former without its text embeddings cannot read an instruction: not an InstructBLIP.
    no_text = {k: v for k, v in sd.items() if not k.startswith(("qformer.embeddings.word", "qformer.embeddings.pos"))}
    with pytest.raises(KeyMapError) as err:
        instructblip_to_ours(no_text)
    assert err.value.missing == ["qformer.embeddings.position_embeddings.weight", "qformer.embeddings.word_embeddings.weight"]


def test_old_position_ids_buffer_is_accepted():
    sd = _hf_state()
    ids = torch.arange(64).expand(1, -1)
    assert set(instructblip_to_ours({**sd, "qformer.embeddings.position_ids": ids})) == set(instructblip_to_ours(sd))
