"""The server shares an image's soft prompt among the jobs about it batched together (issue 13): the
continuous decoder prefills a shared prefix once and every row still gets `generate`'s tokens for it alone; the
engine's whole-batch (beam) and continuous (greedy) paths answer several questions about one image exactly as
`Blip2.ask` answers each alone, running the LLM over the soft prompt once."""

from __future__ import annotations

import asyncio

import pytest
import tiny_models as tm
import torch
from transformers import AutoModelForCausalLM

from blip2.serve.continuous import ContinuousDecoder
from blip2.serve.engine import Engine, GenerationJob

WIDTH, QUERIES = 32, 4
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Using the model-agnostic")]


@pytest.fixture(scope="module", params=["opt", "llama"])
def lm(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tm.text_config(request.param)).eval()
    tm._randomize(model, 0)
    return model


def test_rows_sharing_a_prefix_prefill_it_once_and_decode_as_alone(lm):
    gen = torch.Generator().manual_seed(3)
    prefixes = [0.5 * torch.randn(QUERIES, WIDTH, generator=gen) for _ in range(2)]
    texts = [0.5 * torch.randn(n, WIDTH, generator=gen) for n in (3, 7, 1, 5, 2)]
    owners = [0, 1, 0, 0, 1]
    settings = [dict(max_new_tokens=n) for n in (6, 9, 4, 8, 7)]
    decoder = ContinuousDecoder(lm, max_batch=8)
    requests = {}
    for i, (owner, text, s) in enumerate(zip(owners, texts, settings)):
        embeds = torch.cat([prefixes[owner], text])
        requests[i] = (embeds, s)
        decoder.add(i, embeds, s, prefix=f"image{owner}", prefix_len=QUERIES)
    passes, handle = tm.record_passes(lm)
    tokens: dict[int, list[int]] = {i: [] for i in requests}
    try:
        for _ in range(12):
            for key, token, _ in decoder.step():
                tokens[key].append(token)
    finally:
        handle.remove()
    assert decoder.active == 0
    assert passes[:2] == [(2, QUERIES), (5, 7)], passes  # two prefixes once, then the texts, left-padded
    for i, (embeds, s) in requests.items():
        mask = torch.ones(1, embeds.shape[0], dtype=torch.long)
        with torch.no_grad():
            alone = lm.generate(inputs_embeds=embeds[None], attention_mask=mask, pad_token_id=lm.config.pad_token_id, **s)
        assert tokens[i] == alone[0].tolist(), i


def test_prefix_len_must_leave_the_text_a_position(lm):
    decoder = ContinuousDecoder(lm, max_batch=2)
    with pytest.raises(ValueError, match="prefix_len"):
        decoder.add("a", torch.zeros(QUERIES, WIDTH), {"max_new_tokens": 2}, prefix="x", prefix_len=QUERIES)


@pytest.fixture(scope="module")
def blip2_model(tmp_path_factory):
    import blip2

    folder = tmp_path_factory.mktemp("shared-engine") / "llama"
    tm.save_generation_model(folder, "llama", num_queries=QUERIES, seed=2)
    return blip2.load(str(folder), device="cpu")


@pytest.mark.parametrize("settings", [{"num_beams": 1, "max_new_tokens": 6}, {"num_beams": 3, "max_new_tokens": 6}],
                         ids=["continuous-greedy", "whole-batch-beams"])
def test_questions_about_one_image_share_its_soft_prompt(blip2_model, settings):
    """As /v1/ask with several questions: one job per question, one image hash."""
    questions = ["what color is this ?", "what ?", "is it a big red circle on the square ?", "two ?"]
    image = tm.images(1, seed=3)[0]
    engine = Engine(blip2_model, max_batch_size=8, max_wait_s=0.3)
    passes, handle = tm.record_passes(blip2_model.model.language_model)
    engine.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            ref = engine.image_ref("one-image", image)
            jobs = [GenerationJob(loop, ref, f"Question: {q} Answer:", q, dict(settings)) for q in questions]
            for job in jobs:
                engine.submit(job)
            return await asyncio.gather(*(job.future for job in jobs))

        results = asyncio.run(main())
    finally:
        engine.stop()
        handle.remove()
    assert engine.metrics.batch_size.total == 1  # one batch
    assert passes[0] == (1, QUERIES)  # the soft prompt, once for the four questions (and their beams)
    assert [r.text for r in results] == [blip2_model.ask(image, q, **settings)[0] for q in questions]
