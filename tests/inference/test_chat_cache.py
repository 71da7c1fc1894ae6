"""The chat session's kept key/value cache (issue 13): every turn's tokens equal re-running the whole
conversation prompt through generate (greedy and beam, tiny random OPT and Llama), each turn prefills only the
tokens the cache does not hold, and the models where nothing can be kept (Flan-T5, question_to_qformer) run one
full pass per turn, unchanged."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import tiny_models as tm
import torch

import blip2
from blip2.data.text import chat_prompt, vqa_template
from blip2.inference.pipeline import Blip2, ChatSession
from blip2.models.blip2 import Blip2Model
from blip2.models.language.causal import CausalLanguageModel
from blip2.models.language.seq2seq import Seq2SeqLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = 4
QUESTIONS = [
    "what color is this ?",
    "what shape is it ?",
    "is it a cat ?",
    "what is on the square ?",
    "are there two ?",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Blip2]:
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for kind in ("opt", "llama", "t5"):
        tm.save_generation_model(root / kind, kind, num_queries=QUERIES, seed=3)
        out[kind] = blip2.load(root / kind)
    return out


@pytest.fixture
def recorded(monkeypatch):
    """The token ids every LLM generate call returns, in order (the kept path's and the reference's)."""
    calls: list[torch.Tensor] = []
    for cls in (CausalLanguageModel, Seq2SeqLanguageModel):
        original = cls.generate

        def wrapped(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            calls.append(out.clone())
            return out

        monkeypatch.setattr(cls, "generate", wrapped)
    return calls


def _reference(model: Blip2, session: ChatSession, question: str) -> tuple[list[int], torch.Tensor]:
    """The prompt ids and tokens of re-running the turn just asked as one whole prompt (the plain path)."""
    prompt = chat_prompt(session.history[:-1], question, vqa_template(model.is_encoder_decoder))
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    soft = model.soft_prompts(session.image_feats, [question])
    gen = {k: v for k, v in session.generation.items() if k != "seed"}
    with torch.no_grad():
        tokens = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), soft_prompt=soft, **gen)
    return ids[0].tolist(), tokens


def _converse(model: Blip2, recorded: list[torch.Tensor], session: ChatSession, questions=QUESTIONS) -> list[int]:
    """Asks every question; checks each turn's tokens against the full re-run. Returns each turn's prompt length."""
    lengths = []
    for question in questions:
        recorded.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropped turns
            answer = session.ask(question)
        kept = recorded[0]
        ids, reference = _reference(model, session, question)
        assert torch.equal(kept[:1], reference[:1]), f"turn {len(lengths) + 1}: {kept} != {reference}"
        assert answer == model._decode(reference[:1])[0]
        lengths.append(len(ids))
    return lengths


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_kept_cache_tokens_equal_rerunning_the_whole_prompt(models, recorded, kind, beams):
    model = models[kind]
    session = model.chat(tm.images(1, seed=4)[0], num_beams=beams, max_new_tokens=6)
    assert session.keeps_cache
    _converse(model, recorded, session)
    assert session.cached_tokens >= QUERIES + 30  # the conversation is really held
    assert any(len(a) for _, a in session.history), "every answer empty: the test would check too little"


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_kept_cache_with_sampling_and_a_seed(models, recorded, kind):
    model = models[kind]
    session = model.chat(tm.images(1, seed=5)[0], do_sample=True, num_beams=1, top_k=5, seed=7, max_new_tokens=5)
    assert session.keeps_cache
    for question in QUESTIONS[:4]:
        recorded.clear()
        session.ask(question)
        with torch.random.fork_rng():  # seeded as the session seeds each turn
            torch.manual_seed(7)
            _, reference = _reference(model, session, question)
        assert torch.equal(recorded[0], reference)


@pytest.mark.parametrize("beams", [1, 3])
def test_each_turn_prefills_only_what_the_cache_does_not_hold(models, recorded, beams):
    """A forward hook records (rows, positions) of every LLM pass. The prompt positions a turn feeds are
    [soft prompt; prompt] on turn 1 and only the new part later; with beams the prompt (but its last token)
    is prefilled on one row, then copied to the beams. Fails if the cache is silently unused."""
    model = models["llama"]
    passes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        passes.append(tuple(x.shape[:2]))

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        session = model.chat(tm.images(1, seed=4)[0], num_beams=beams, max_new_tokens=6)
        lengths, fed = [], []
        for question in QUESTIONS:
            passes.clear()
            recorded.clear()
            session.ask(question)
            if beams == 1:  # every pass has one row; each decode step after the prefill feeds one position
                fed.append(sum(n for _, n in passes) - (recorded[0].shape[1] - 1))
            else:  # the prompt but its last token on one row, then generate's passes on the beams' rows
                assert all(rows == beams for rows, n in passes if rows != 1) and passes[-1][0] == beams, passes
                fed.append(sum(n for rows, n in passes if rows == 1) + 1)
            ids, reference = _reference(model, session, question)
            assert torch.equal(recorded[0][:1], reference[:1])
            lengths.append(len(ids))
    finally:
        handle.remove()
    assert fed[0] == QUERIES + lengths[0]
    for turn in range(1, len(QUESTIONS)):
        new = lengths[turn] - lengths[turn - 1]  # the previous answer, ". ", and the new question
        if beams == 1:  # the cache may also hold the previous answer's tokens
            assert 1 <= fed[turn] <= new, (turn, fed, lengths)
        else:  # after beam search it holds the previous prompt exactly
            assert fed[turn] == new, (turn, fed, lengths)
    assert sum(fed[1:]) < sum(lengths[1:]) // 2  # far less than re-running every prompt


def test_dropped_turns_change_the_prefix_and_stay_exact(models, recorded):
    model = models["opt"]
    one_turn = len(model.tokenizer(f"Question: {QUESTIONS[0]} Answer:")["input_ids"])
    session = model.chat(tm.images(1, seed=6)[0], num_beams=1, max_new_tokens=4, max_prompt_tokens=2 * one_turn + 8)
    _converse(model, recorded, session, QUESTIONS + QUESTIONS[:3])
    assert session.dropped_turns >= 2


def test_reset_keeps_a_valid_cache(models, recorded):
    model = models["llama"]
    session = model.chat(tm.images(1, seed=4)[0], num_beams=1, max_new_tokens=4)
    _converse(model, recorded, session, QUESTIONS[:3])
    session.reset()
    _converse(model, recorded, session, QUESTIONS[3:])


def test_flan_t5_falls_back_to_full_passes(models, recorded):
    model = models["t5"]
    session = model.chat(tm.images(1, seed=4)[0], num_beams=3, max_new_tokens=5)
    assert not session.keeps_cache
    _converse(model, recorded, session, QUESTIONS[:4])
    assert session.cached_tokens == 0


def test_question_to_qformer_falls_back_to_full_passes(recorded):
    base = tm.our_config("llama", num_queries=QUERIES)
    config = dataclasses.replace(base, qformer=dataclasses.replace(base.qformer, use_text_input=True),
                                 question_to_qformer=True)
    net = Blip2Model(config).eval()
    tm._randomize(net, seed=2)
    model = Blip2(net, tm.word_tokenizer("llama"), tm.word_tokenizer("bert"))
    for beams in (1, 3):
        session = model.chat(tm.images(1, seed=4)[0], num_beams=beams, max_new_tokens=5)
        assert not session.keeps_cache
        _converse(model, recorded, session, QUESTIONS[:4])
        assert session.cached_tokens == 0
