"""The opt-in compiled decode (`blip2.load(..., compile_decode=True)`: a static key/value cache and a
torch.compile'd forward) gives the plain path's tokens on tiny random OPT and Llama, greedy and seeded sampling,
batched and left-padded, also where a filled cache is passed in: many questions about one and two images (the
shared soft-prompt prefix, `generate_shared`) and a 4-turn chat (the kept cache, static between turns). The
compiled forward really runs, and a second call of a nearby length reuses the compiled graph (the static cache is
bucketed). Beam search is left to the plain path; Flan-T5 is refused.

Inductor spends about a minute per new shape on this CPU, so the fast tests compile with dynamo's "eager"
backend (the same tracing, static cache, guards and recompiles; the graph runs eager kernels) and share one plain
and one compiled model per LLM kind; `test_inductor_gives_the_plain_tokens` (slow) runs inductor itself."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from transformers import CompileConfig, StaticCache

import blip2
from blip2.inference.pipeline import Blip2
from blip2.models.language import fast_decode

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["what color is this ?", "is it a big red circle on the square ?", "what ?"]
GREEDY = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 6}
SAMPLED = {"do_sample": True, "top_k": 0, "seed": 5, "max_new_tokens": 5, "num_beams": 1}
TURNS = ["what color is this ?", "is it a circle ?", "what shape is it ?", "is there a dog on the square ?"]


def _graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (a recompile adds one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _pair(folder, kind: str) -> tuple[Blip2, Blip2]:
    """(plain, compiled) models with the same weights; the compiled model's LLM counts how often `generate`
    picks its compiled forward (`get_compiled_call`: it does so for the decode steps only)."""
    tm.save_generation_model(folder, kind, num_queries=4, seed=7)
    plain, compiled = blip2.load(folder), blip2.load(folder, compile_decode=True)
    llm = compiled.model.language_model
    original = llm.get_compiled_call
    llm.compiled_calls = 0

    def counted(config, llm=llm, original=original):
        llm.compiled_calls += 1
        return original(config)

    llm.get_compiled_call = counted
    return plain, compiled


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (plain, compiled), compiled with dynamo's eager backend (see the module docstring)."""
    root = tmp_path_factory.mktemp("compiled")
    eager = CompileConfig(fullgraph=False, backend="eager", mode=None)
    eager._compile_all_devices = True
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_decode, "COMPILE_CONFIG", eager)
        yield {kind: _pair(root / kind, kind) for kind in ("opt", "llama")}


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_captions_and_one_image_questions_give_the_plain_tokens(pairs, kind):
    plain, compiled = pairs[kind]
    llm = compiled.model.language_model
    images = tm.images(len(QUESTIONS), seed=3)
    before = llm.compiled_calls
    assert compiled.ask(images, QUESTIONS, **GREEDY) == plain.ask(images, QUESTIONS, **GREEDY)
    assert compiled.caption(images, **SAMPLED) == plain.caption(images, **SAMPLED)
    # One image, many questions: the shared prefix's cache, copied into a static one, decoded compiled.
    for gen in (GREEDY, SAMPLED):
        assert compiled.ask(images[0], QUESTIONS, **gen) == plain.ask(images[0], QUESTIONS, **gen)
    assert llm.compiled_calls == before + 4, "every greedy/sampled call must decode compiled"
    assert hasattr(llm, "_compiled_call") and not hasattr(plain.model.language_model, "_compiled_call")
    beams = {"num_beams": 3, "max_new_tokens": 4}  # not compiled: the plain path, same tokens
    assert compiled.caption(images[:2], **beams) == plain.caption(images[:2], **beams)
    assert compiled.ask(images[0], QUESTIONS, **beams) == plain.ask(images[0], QUESTIONS, **beams)
    assert llm.compiled_calls == before + 4


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_questions_about_two_images_share_their_prefixes_compiled(pairs, kind):
    """generate_shared with two distinct prefixes and left-padded questions: the plain (eager, dynamic cache)
    tokens, greedy and seeded sampling; a second batch of other (nearby) lengths compiles nothing new."""
    plain, compiled = pairs[kind]
    batches = [QUESTIONS, ["two ?", "is it a circle ?", "what shape is it ?"]]  # 3 rows, as above: no new batch size
    rows = torch.tensor([0, 1, 1])
    soft = plain.soft_prompts(plain.encode_images(tm.images(2, seed=2)))  # (2, Q, H): same weights in both
    pad = plain.tokenizer.pad_token_id
    for gen in ({**GREEDY, "pad_token_id": pad}, {**SAMPLED, "pad_token_id": pad}):
        gen = dict(gen)
        seed = gen.pop("seed", None)
        for batch in batches:
            tokens = plain.tokenizer([f"Question: {q} Answer:" for q in batch], return_tensors="pt",
                                     padding=True, padding_side="left")
            assert (tokens["attention_mask"] == 0).any(), "the batch must be left-padded"
            args = (soft, rows, tokens["input_ids"], tokens["attention_mask"])
            outs = []
            for model in (plain, compiled):
                with torch.random.fork_rng():
                    torch.manual_seed(seed or 0)
                    outs.append(model.model.lm.generate_shared(*args, **gen))
            assert torch.equal(outs[0], outs[1]), outs
            if batch is batches[0]:
                graphs = _graphs()
        assert _graphs() == graphs, "a batch of nearby lengths recompiled the decode step"


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("gen", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_chat_keeps_a_static_cache_and_gives_the_plain_tokens(pairs, kind, gen):
    plain, compiled = pairs[kind]
    image = tm.images(1, seed=4)[0]
    chats = [plain.chat(image, **gen), compiled.chat(image, **gen)]
    llm = compiled.model.language_model
    for turn, question in enumerate(TURNS):
        before, graphs = llm.compiled_calls, _graphs()
        answers = [chat.ask(question) for chat in chats]
        assert answers[0] == answers[1], (turn, answers)
        assert llm.compiled_calls == before + 1
        assert isinstance(chats[1]._cache, StaticCache), "the chat keeps its static cache between turns"
        assert chats[1].cached_tokens == chats[0].cached_tokens > 0  # the same positions, only this turn prefilled
        if turn == len(TURNS) - 1:  # the last turn fits the bucket the third one used: nothing recompiles
            assert chats[1]._cache.get_max_length() == fast_decode.CACHE_BUCKET
            assert _graphs() == graphs
    assert [h[1] for h in chats[0].history] == [h[1] for h in chats[1].history]


def test_static_cache_copies_keys_and_buckets_lengths():
    """The static copy holds the dynamic cache's keys/values exactly; one long enough is reused as is."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    llm = LlamaForCausalLM(config).eval()
    dynamic = DynamicCache(config=config)
    with torch.no_grad():
        llm(input_ids=torch.randint(0, 32, (2, 7)), cache=dynamic, use_cache=True)
    static = fast_decode.static_cache(llm, 7 + 60, dynamic)
    assert static.get_max_length() == 128 and int(static.get_seq_length()) == 7
    for new, old in zip(static.layers, dynamic.layers, strict=True):
        assert torch.equal(new.keys[:, :, :7], old.keys) and torch.equal(new.values[:, :, :7], old.values)
    assert fast_decode.static_cache(llm, 100, static) is static
    bigger = fast_decode.static_cache(llm, 130, static)
    assert bigger.get_max_length() == 192 and torch.equal(bigger.layers[1].keys[:, :, :7], dynamic.layers[1].keys)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_inductor_gives_the_plain_tokens(tmp_path, kind):
    """The library's own config (inductor): many left-padded questions about one image, greedy and seeded
    sampling, and a 4-turn greedy chat, as the plain path; a nearby second batch compiles nothing new."""
    plain, compiled = _pair(tmp_path / kind, kind)
    image = tm.images(1, seed=3)
    for gen in (GREEDY, SAMPLED):
        assert compiled.ask(image, QUESTIONS, **gen) == plain.ask(image, QUESTIONS, **gen)
    graphs = _graphs()
    others = ["two ?", "is it a circle ?", "what shape is it ?"]
    assert compiled.ask(image, others, **GREEDY) == plain.ask(image, others, **GREEDY)
    assert _graphs() == graphs
    chats = [plain.chat(image[0], **GREEDY), compiled.chat(image[0], **GREEDY)]
    for question in TURNS:
        assert chats[0].ask(question) == chats[1].ask(question)
    assert compiled.model.language_model.compiled_calls == 3 + len(TURNS)


def test_compiled_decode_refuses_encoder_decoder_llms(tmp_path):
    tm.save_generation_model(tmp_path / "t5", "t5", num_queries=4, seed=7)
    with pytest.raises(ValueError, match="decoder-only"):
        blip2.load(tmp_path / "t5", compile_decode=True)


def test_cli_compile_decode_flag(tmp_path, capsys, monkeypatch):
    """`blip2 caption --compile-decode` answers as the plain command does (eager backend: see the docstring)."""
    from blip2.cli import main

    eager = CompileConfig(fullgraph=False, backend="eager", mode=None)
    eager._compile_all_devices = True
    monkeypatch.setattr(fast_decode, "COMPILE_CONFIG", eager)

    tm.save_generation_model(tmp_path / "opt", "opt", num_queries=4, seed=7)
    image = tmp_path / "img.png"
    tm.images(1, seed=3)[0].save(image)
    args = ["caption", str(image), "--model", str(tmp_path / "opt"), "--num-beams", "1", "--max-new-tokens", "4"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--compile-decode"])
    assert capsys.readouterr().out == plain and plain.strip()
