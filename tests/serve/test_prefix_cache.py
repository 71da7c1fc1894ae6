"""The server's prefix cache across requests (issue 13): a chat resent whole each turn gives the tokens it gives
without the cache (greedy and beam, OPT and Llama), while its later turns prefill only their new tokens; the
cache is an LRU bounded in bytes, off with 0, and stays away from Flan-T5 and question-reading soft prompts."""

from __future__ import annotations

import asyncio

import pytest
import tiny_models as tm
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from blip2.data.text import chat_prompt
from blip2.serve.continuous import ContinuousDecoder
from blip2.serve.engine import Engine, GenerationJob
from blip2.serve.prefix_cache import PrefixCache

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Using the model-agnostic")]

WIDTH, QUERIES = 32, 4
QUESTIONS = ["what is this ?", "what color is it ?", "is it big ?", "where is the red one ?"]


def _cache(positions: int, layers: int = 2, fill: float = 0.0) -> DynamicCache:
    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.full((1, 2, positions, 4), fill), torch.full((1, 2, positions, 4), fill), i)
    return cache


# --------------------------------------------------------------------------------------------- the cache


def test_lookup_finds_the_longest_prefix_and_copies_it():
    soft = torch.ones(QUERIES, 8)
    cache = PrefixCache(max_bytes=1 << 20)
    cache.put("img", soft, [5, 6, 7, 8], _cache(QUERIES + 4, fill=1.0))
    cache.put("img", soft, [5, 9], _cache(QUERIES + 2, fill=2.0))
    found, length = cache.lookup("img", soft, [5, 6, 7, 1, 1])
    assert length == QUERIES + 3 and found.get_seq_length() == QUERIES + 3
    assert float(found.layers[0].keys[0, 0, 0, 0]) == 1.0  # from the [5, 6, 7, 8] entry
    found.layers[0].keys.zero_()  # a copy: the entry is untouched
    assert cache.lookup("img", soft, [5, 6, 7, 8, 2])[0].layers[0].keys.max() == 1.0
    # The last prompt token is always left to prefill (its logits give the first new token).
    assert cache.lookup("img", soft, [5, 6, 7, 8])[1] == QUERIES + 3
    assert cache.lookup("img", soft, [3])[1] == QUERIES  # the soft prompt alone is still a hit
    assert cache.lookup("other", soft, [5, 6]) is None  # another image
    assert cache.lookup("img", soft + 1e-6, [5, 6]) is None  # another soft prompt (e.g. rounded differently)
    assert (cache.hits, cache.misses) == (4, 2)
    assert cache.reused_tokens == (QUERIES + 3) + (QUERIES + 4) + (QUERIES + 3) + QUERIES


def test_an_lru_bounded_in_bytes_that_drops_entries_a_newer_one_extends():
    soft = torch.zeros(QUERIES, 8)
    one = _cache(QUERIES + 2)  # 2 layers * (keys + values) * 2 heads * 6 positions * 4 * 4 bytes = 768
    size = 768 + soft.numel() * 4
    cache = PrefixCache(max_bytes=2 * size + 10)
    cache.put("a", soft, [1, 2], one)
    cache.put("a", soft, [1, 2, 3, 4], _cache(QUERIES + 4))  # extends [1, 2]: the older entry goes
    assert len(cache) == 1 and cache.lookup("a", soft, [1, 2, 7])[1] == QUERIES + 2
    cache.put("b", soft, [1, 2], _cache(QUERIES + 2))
    cache.put("c", soft, [1, 2], _cache(QUERIES + 2))  # over budget: the least recently used ("a") goes
    assert len(cache) == 2 and cache.evictions == 1 and cache.bytes == 2 * size
    assert cache.lookup("a", soft, [1, 2, 7]) is None and cache.lookup("b", soft, [1, 2, 7]) is not None
    with pytest.raises(ValueError, match="positions"):
        cache.put("d", soft, [1], _cache(QUERIES + 2))
    off = PrefixCache(max_bytes=0)
    off.put("a", soft, [1, 2], _cache(QUERIES + 2))
    assert len(off) == 0 and off.bytes == 0


# ---------------------------------------------------------------------------------------- the decoder


@pytest.fixture(scope="module", params=["opt", "llama"])
def lm(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tm.text_config(request.param)).eval()
    tm._randomize(model, 0)
    return model


def _run(decoder: ContinuousDecoder) -> dict:
    tokens: dict = {}
    for _ in range(40):
        for key, token, _ in decoder.step():
            tokens.setdefault(key, []).append(token)
        if decoder.active == 0 and decoder.waiting == 0:
            break
    return tokens


def test_a_row_continues_from_a_kept_cache_as_generate_alone(lm):
    """Row "a" runs and keeps its cache; row "b" starts with a's [embeds; answer] and more: it prefills only
    its new part from a's kept rows, joined to a batch mate, and gets generate's tokens for it alone."""
    gen = torch.Generator().manual_seed(5)
    first = 0.5 * torch.randn(9, WIDTH, generator=gen)
    kept: list = []
    decoder = ContinuousDecoder(lm, max_batch=4)
    decoder.add("a", first, {"max_new_tokens": 5}, keep=lambda cache, fed: kept.append((cache, fed)))
    answer = _run(decoder)["a"]
    (cache, fed), = kept
    assert fed == answer[:-1] and cache.get_seq_length() == 9 + len(fed)
    embed = lm.get_input_embeddings()
    second = torch.cat([first, embed(torch.tensor(fed)).detach(), 0.5 * torch.randn(4, WIDTH, generator=gen)])
    other = 0.5 * torch.randn(6, WIDTH, generator=gen)
    decoder.add("b", second, {"max_new_tokens": 7}, past=cache)
    decoder.add("c", other, {"max_new_tokens": 3})
    passes, handle = tm.record_passes(lm)
    try:
        tokens = _run(decoder)
    finally:
        handle.remove()
    assert passes[:2] == [(1, 6), (1, 4)], passes  # c alone; b: only its 4 new embeddings
    for key, embeds, n in (("b", second, 7), ("c", other, 3)):
        with torch.no_grad():
            alone = lm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                                pad_token_id=lm.config.pad_token_id, max_new_tokens=n)
        assert tokens[key] == alone[0].tolist(), key


def test_past_must_leave_a_position(lm):
    decoder = ContinuousDecoder(lm, max_batch=2)
    with pytest.raises(ValueError, match="past"):
        decoder.add("a", torch.zeros(3, WIDTH), {"max_new_tokens": 2}, past=_cache(3, fill=0.0))


# ------------------------------------------------------------------------------------------ the engine


def _load(tmp_path_factory, kind: str):
    import blip2

    folder = tmp_path_factory.mktemp(f"prefix-{kind}") / kind
    tm.save_generation_model(folder, kind, num_queries=QUERIES, seed=4)
    return blip2.load(str(folder), device="cpu")


@pytest.fixture(scope="module", params=["opt", "llama"])
def blip2_model(request, tmp_path_factory):
    return _load(tmp_path_factory, request.param)


def _conversation(engine: Engine, image, settings: dict, turns: int = 4, after_turn=lambda: None) -> list[str]:
    """A client that resends the whole conversation each turn, as chat completions do."""
    answers: list[str] = []

    async def main():
        loop = asyncio.get_running_loop()
        for question in QUESTIONS[:turns]:
            prompt = chat_prompt(list(zip(QUESTIONS, answers)), question)
            job = engine.submit(GenerationJob(loop, engine.image_ref("the-image", image), prompt, None, dict(settings)))
            answers.append((await job.future).text)
            after_turn()

    engine.start()
    try:
        asyncio.run(main())
    finally:
        engine.stop()
    return answers


@pytest.mark.parametrize("settings", [{"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 2},
                                      {"num_beams": 3, "max_new_tokens": 6, "min_new_tokens": 2},
                                      {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 2, "do_sample": True,
                                       "temperature": 1.0, "seed": 5}],
                         ids=["greedy", "beams", "seeded-sampling"])
def test_a_resent_conversation_equals_the_uncached_server_and_prefills_only_new_tokens(blip2_model, settings):
    image = tm.images(1, seed=8)[0]
    plain = Engine(blip2_model, max_wait_s=0.0, prefix_cache_bytes=0)
    assert plain.prefix is None
    expected = _conversation(plain, image, settings)
    engine = Engine(blip2_model, max_wait_s=0.0)
    passes, handle = tm.record_passes(blip2_model.model.language_model)
    turns: list[tuple[int, int]] = []  # after each turn: (passes so far, positions reused so far)
    try:
        answers = _conversation(engine, image, settings,
                                after_turn=lambda: turns.append((len(passes), engine.prefix.reused_tokens)))
    finally:
        handle.remove()
    assert answers == expected
    prompts = [chat_prompt(list(zip(QUESTIONS, answers[:k])), QUESTIONS[k]) for k in range(4)]
    lengths = [len(blip2_model.tokenizer(p)["input_ids"]) for p in prompts]
    prefix = engine.prefix
    assert (prefix.hits, prefix.misses) == (3, 1)
    beams = settings["num_beams"] > 1  # generate prefills the prompt's last token itself, with the decode steps
    bounds = [(0, 0), *turns]
    for k in range(4):
        # Positions prefilled in turn k (a decode step feeds one position; so may a 1-token prefill, not counted).
        prefilled = sum(n for _, n in passes[bounds[k][0] : bounds[k + 1][0]] if n > 1)
        reused = bounds[k + 1][1] - bounds[k][1]
        if k == 0:
            assert (prefilled, reused) == (QUERIES + lengths[0] - beams, 0)
        else:  # the soft prompt and the whole earlier conversation come from the cache: only new tokens run
            assert reused >= QUERIES + lengths[k - 1], (k, reused, lengths)
            assert prefilled <= lengths[k] - lengths[k - 1], (k, prefilled, lengths)
    text = engine.metrics.render()
    assert "blip2_prefix_cache_hits_total 3" in text and f"blip2_prefix_cache_bytes {prefix.bytes}" in text


def test_a_tiny_budget_evicts_and_zero_turns_it_off(blip2_model):
    image, other = tm.images(2, seed=9)
    greedy = {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 4}
    engine = Engine(blip2_model, max_wait_s=0.0)
    _conversation(engine, image, greedy, turns=1)
    one = engine.prefix.bytes
    assert one > 0 and len(engine.prefix) == 1
    small = Engine(blip2_model, max_wait_s=0.0, prefix_cache_bytes=int(one * 1.5))

    async def two_images():
        loop = asyncio.get_running_loop()
        for sha, img in (("first", image), ("second", other)):
            await small.submit(GenerationJob(loop, small.image_ref(sha, img), "a photo of", None, dict(greedy))).future

    small.start()
    try:
        asyncio.run(two_images())
    finally:
        small.stop()
    assert len(small.prefix) == 1 and small.prefix.evictions == 1 and small.prefix.bytes <= int(one * 1.5)
    off = Engine(blip2_model, prefix_cache_bytes=0)
    assert off.prefix is None and "blip2_prefix_cache_hits_total 0" in off.metrics.render()


def _instructblip(folder):
    """A random InstructBLIP (OPT LLM) as a hub folder: its soft prompt reads the question."""
    import blip2

    tm.save_instructblip_model(folder, "opt", num_queries=QUERIES, cross_freq=1, seed=3)
    return blip2.load(str(folder), device="cpu")


def test_flan_t5_and_question_reading_soft_prompts_keep_the_plain_path(tmp_path_factory):
    t5 = _load(tmp_path_factory, "t5")
    instruct = _instructblip(tmp_path_factory.mktemp("prefix-instructblip"))
    assert instruct.model.config.question_to_qformer
    image = tm.images(1, seed=8)[0]
    greedy = {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 2}
    for model in (t5, instruct):
        engine = Engine(model, max_wait_s=0.0)
        assert engine.prefix is None  # T5: no kept decoder cache; InstructBLIP: a soft prompt per question
        assert "blip2_prefix_cache_misses_total 0" in engine.metrics.render()
        assert _conversation(engine, image, greedy, turns=2) == \
            _conversation(Engine(model, max_wait_s=0.0, prefix_cache_bytes=0), image, greedy, turns=2)


# ------------------------------------------------------------------------------------- the real server


@pytest.mark.slow  # two server processes (~25 s to start each on this CPU)
def test_chat_completions_through_the_server_with_and_without_the_prefix_cache(tmp_path_factory):
    """`blip2 serve` under uvicorn, driven by the `openai` client: a 4-turn chat resent whole each turn gets
    the same answers from a server with the cache (default) and one with `--prefix-cache-mb 0`, and /metrics
    shows the later turns served from it."""
    openai = pytest.importorskip("openai")
    import httpx
    from live import Server, data_url, save_full_model

    folder = save_full_model(tmp_path_factory.mktemp("prefix-serve") / "full")
    url = data_url(tm.images(1, seed=11)[0])
    transcripts = {}
    for name, extra in (("cached", ()), ("plain", ("--prefix-cache-mb", "0"))):
        server = Server(folder, "--max-wait-ms", "0", "--served-model-name", "m", *extra)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            messages: list[dict] = []
            answers = []
            for k, question in enumerate(QUESTIONS):
                text = [{"type": "text", "text": question}]
                content = [{"type": "image_url", "image_url": {"url": url}}, *text] if k == 0 else text
                messages.append({"role": "user", "content": content})
                out = client.chat.completions.create(messages=messages, model="m", max_tokens=6, temperature=0)
                answers.append(out.choices[0].message.content)
                messages.append({"role": "assistant", "content": answers[-1]})
            metrics = httpx.get(server.url + "/metrics").text
        finally:
            assert server.stop() == 0, "".join(server.stderr[-30:])
        assert not any("Traceback" in line for line in server.stderr), "".join(server.stderr[-60:])
        transcripts[name] = (answers, metrics)
    assert transcripts["cached"][0] == transcripts["plain"][0]
    assert any(transcripts["cached"][0])  # the tiny model says something
    assert "blip2_prefix_cache_hits_total 3" in transcripts["cached"][1]
    assert "blip2_prefix_cache_misses_total 1" in transcripts["cached"][1]
    assert "blip2_prefix_cache_hits_total 0" in transcripts["plain"][1]
