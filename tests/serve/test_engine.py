"""The server's pieces in process: the feature cache's byte bound, the worker's batching and stop strings,
eviction between a handler's look-up and the worker's use, and the Prometheus text."""

from __future__ import annotations

import asyncio
import re

import pytest
import tiny_models as tm
import torch

from blip2.serve.cache import FeatureCache
from blip2.serve.engine import Engine, GenerationJob, _cut_at_stop, _stop_prefix_len
from blip2.serve.metrics import Metrics

GREEDY = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 0}


@pytest.fixture(scope="module")
def blip2_model(tmp_path_factory):
    import blip2

    folder = tmp_path_factory.mktemp("engine") / "opt"
    tm.save_generation_model(folder, "opt")
    return blip2.load(str(folder), device="cpu")


def test_feature_cache_is_an_lru_bounded_in_bytes():
    one = torch.zeros(1, 4, 8)  # 128 bytes
    cache = FeatureCache(max_bytes=300)
    cache.put("a", one)
    cache.put("b", one)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", one)  # 384 bytes > 300: the least recent (b) goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 256 and cache.hits == 1
    assert cache.get("b") is None and cache.misses == 1
    FeatureCache(max_bytes=0).put("x", one)  # caching off: nothing kept, no error


def test_stop_strings_cut_and_hold_back_partial_matches():
    assert _cut_at_stop("red circle. blue", [".", "blue"]) == ("red circle", True)
    assert _cut_at_stop("red circle", ["x"]) == ("red circle", False)
    assert _stop_prefix_len("a red ci", ["circle"]) == 2  # "ci" may start "circle": not streamed yet
    assert _stop_prefix_len("a red", ["circle"]) == 0


def _jobs(loop_holder, engine, images, prompts, settings):
    refs = [engine.image_ref(f"sha{i}", img) for i, img in enumerate(images)]
    return [GenerationJob(loop_holder, ref, p, "", dict(settings)) for ref, p in zip(refs, prompts)]


@pytest.mark.parametrize("continuous", [True, False])
def test_batched_jobs_equal_the_library_and_share_a_pass(blip2_model, continuous):
    engine = Engine(blip2_model, max_batch_size=8, max_wait_s=0.2, continuous=continuous)
    images = tm.images(4, seed=1)
    prompts = ["", "a photo of", "question : what is this ? answer :", "two"]
    engine.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            jobs = _jobs(loop, engine, images, prompts, GREEDY)
            for job in jobs:
                engine.submit(job)
            return await asyncio.gather(*(job.future for job in jobs))

        results = asyncio.run(main())
    finally:
        engine.stop()
    expected = [blip2_model.caption(img, prompt=p, **GREEDY)[0] for img, p in zip(images, prompts)]
    assert [r.text for r in results] == expected
    assert engine.metrics.batch_size.total == 1 and engine.metrics.batch_size.sum == 4
    assert all(r.completion_tokens >= 1 and r.prompt_tokens > blip2_model.model.num_queries for r in results)


@pytest.mark.parametrize("continuous", [True, False])
def test_seeded_sampling_repeats_whatever_its_batch_mates(blip2_model, continuous):
    engine = Engine(blip2_model, max_batch_size=8, max_wait_s=0.2, continuous=continuous)
    sampled = {**GREEDY, "do_sample": True, "temperature": 1.0, "seed": 7}
    image = tm.images(1, seed=2)[0]
    engine.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            jobs = [GenerationJob(loop, engine.image_ref("s", image), "", "", dict(sampled)) for _ in range(3)]
            for job in jobs:
                engine.submit(job)
            return await asyncio.gather(*(job.future for job in jobs))

        results = asyncio.run(main())
    finally:
        engine.stop()
    assert len({r.text for r in results}) == 1  # the seed alone decides the tokens
    # Continuous rows draw from their own seeded generator; whole-batch generate shares the global RNG, so a
    # seeded job runs alone there.
    assert engine.metrics.batch_size.total == (1 if continuous else 3)
    assert results[0].text == blip2_model.caption(image, **sampled)[0]


def test_features_survive_eviction_after_the_lookup(blip2_model):
    engine = Engine(blip2_model)
    image = tm.images(1, seed=3)[0]
    feats = blip2_model.encode_images([image])
    engine.cache.put("k", feats)
    ref = engine.image_ref("k", image)
    assert ref.pixels is None  # cached when the request came in
    engine.cache = FeatureCache(engine.cache.max_bytes)  # ... and evicted before the worker ran it
    torch.testing.assert_close(engine.features([ref]), feats)


def test_prometheus_text_format():
    m = Metrics()
    m.request("/v1/ask", 200, 0.3)
    m.request("/v1/ask", 400, 0.001)
    m.batch(4)
    m.gauge("blip2_queue_depth", "Jobs waiting.", lambda: 2)
    text = m.render()
    assert 'blip2_requests_total{route="/v1/ask",status="200"} 1' in text
    assert 'blip2_request_latency_seconds_bucket{route="/v1/ask",le="0.5"} 2' in text
    assert 'blip2_request_latency_seconds_bucket{route="/v1/ask",le="0.25"} 1' in text
    assert 'blip2_batch_size_bucket{le="4"} 1' in text and 'blip2_batch_size_bucket{le="2"} 0' in text
    assert "# TYPE blip2_queue_depth gauge\nblip2_queue_depth 2" in text
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("#") or re.fullmatch(r"[a-z0-9_]+(\{[^}]*\})? [0-9.e+-]+", line), line


def test_a_short_request_joins_a_running_one_and_leaves_first(blip2_model):
    """Continuous batching: a request that arrives mid-decode joins at the next step and finishes on its own
    schedule; both answers equal the library's alone."""
    engine = Engine(blip2_model, max_batch_size=8, max_wait_s=0.0)
    image, other = tm.images(2, seed=5)
    long = {"num_beams": 1, "max_new_tokens": 100, "min_new_tokens": 100}
    engine.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            first = GenerationJob(loop, engine.image_ref("a", image), "", "", dict(long), stream=True)
            engine.submit(first)
            await first.stream.get()  # it is decoding now
            second = GenerationJob(loop, engine.image_ref("b", other), "a photo of", "", dict(GREEDY))
            engine.submit(second)
            short = await second.future
            assert not first.future.done()  # the long one is still decoding: the short one did not wait for it
            return await first.future, short

        long_result, short_result = asyncio.run(main())
    finally:
        engine.stop()
    assert long_result.completion_tokens == 100 and long_result.finish_reason == "length"
    assert long_result.text == blip2_model.caption(image, **long)[0]
    assert short_result.text == blip2_model.caption(other, prompt="a photo of", **GREEDY)[0]


def test_max_batch_size_one_turns_batching_off(blip2_model):
    engine = Engine(blip2_model, max_batch_size=1, max_wait_s=0.2)
    images = tm.images(3, seed=6)
    engine.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            jobs = _jobs(loop, engine, images, ["", "", ""], GREEDY)
            for job in jobs:
                engine.submit(job)
            return await asyncio.gather(*(job.future for job in jobs))

        results = asyncio.run(main())
    finally:
        engine.stop()
    assert engine.metrics.batch_size.total == 3  # one at a time: no shared vision, Q-Former or decode pass
    assert [r.text for r in results] == [blip2_model.caption(img, **GREEDY)[0] for img in images]
