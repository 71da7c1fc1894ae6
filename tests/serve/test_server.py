"""`blip2 serve` as a real uvicorn process on 127.0.0.1, driven by the official `openai` client and raw HTTP:
answers equal the library's, streaming, multi-turn with the image cache, embeddings, every limit, batching
that changes nothing, and a clean SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tiny_models as tm
from live import Server, data_url, save_full_model

openai = pytest.importorskip("openai")

KEY = "test-key-123"
GREEDY = {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_full_model(tmp_path_factory.mktemp("serve") / "full")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--api-key", KEY, "--max-body-mb", "1", "--max-image-pixels", "250000",
                 "--max-wait-ms", "50")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr[-30:])
    assert not any("Traceback" in line for line in srv.stderr), "".join(srv.stderr[-60:])


@pytest.fixture(scope="module")
def library(model_dir):
    import blip2

    return blip2.load(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def user(image_url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$", re.M)
    m = pattern.search(text)
    return float(m.groups()[-1]) if m else 0.0


IMAGES = tm.images(6, seed=3)


# ------------------------------------------------------------------------------------------ OpenAI client


def test_chat_completion_equals_the_library(client, library):
    url = data_url(IMAGES[0])
    out = client.chat.completions.create(messages=[user(url, "what color is it?")], model=_model(client),
                                         max_tokens=8)
    expected = library.ask(IMAGES[0], "what color is it?", **GREEDY)[0]
    choice = out.choices[0]
    assert choice.message.content == expected
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > library.model.num_queries
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def _model(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(model_dir)]


def test_streaming_gives_the_same_text_in_chunks(client):
    messages = [user(data_url(IMAGES[1]), "what shape is this?")]
    whole = client.chat.completions.create(messages=messages, model=_model(client), max_tokens=8)
    stream = client.chat.completions.create(messages=messages, model=_model(client), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_multi_turn_reuses_the_encoded_image(client, server, library):
    url = data_url(IMAGES[2])
    first = client.chat.completions.create(messages=[user(url, "what is this?")], model=_model(client), max_tokens=8)
    answer = first.choices[0].message.content
    hits = metric(server, "blip2_image_cache_hits_total")
    misses = metric(server, "blip2_image_cache_misses_total")
    second = client.chat.completions.create(
        messages=[user(url, "what is this?"), {"role": "assistant", "content": answer},
                  {"role": "user", "content": "what color is it?"}],
        model=_model(client), max_tokens=8)
    assert metric(server, "blip2_image_cache_hits_total") > hits
    assert metric(server, "blip2_image_cache_misses_total") == misses  # the vision tower did not run again
    chat = library.chat(IMAGES[2], **GREEDY)
    chat.history.append(("what is this?", answer))
    assert second.choices[0].message.content == chat.ask("what color is it?")


def test_embeddings_of_texts_and_images(client, library):
    texts = ["a red circle", "two cats"]
    url = data_url(IMAGES[3])
    out = client.embeddings.create(input=[texts[0], url, texts[1]], model=_model(client))
    assert [d.index for d in out.data] == [0, 1, 2]
    t0, img, t1 = (np.asarray(d.embedding, dtype=np.float32) for d in out.data)
    queries = library.model.num_queries
    image = img.reshape(queries, -1)  # the image's query vectors, query-major
    assert image.shape[1] == t0.shape[0]
    expected = library.similarity([IMAGES[3]], texts)[0].numpy()
    ours = np.array([(image @ t0).max(), (image @ t1).max()])  # max over queries, as BLIP-2's ITC
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    raw = httpx.post(client.base_url.join("embeddings").__str__(), json={"input": url},
                     headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["data"][0]["shape"] == [queries, t0.shape[0]]


# -------------------------------------------------------------------------------------- BLIP-2's routes


def test_caption_ask_itm_retrieve(server, library):
    with http(server) as c:
        url = data_url(IMAGES[0])
        cap = c.post("/v1/caption", json={"image": url, **GREEDY}).json()
        assert cap["caption"] == library.caption(IMAGES[0], **GREEDY)[0]
        buf = io.BytesIO()
        IMAGES[0].save(buf, format="PNG")
        upload = c.post("/v1/caption", files={"image": ("a.png", buf.getvalue(), "image/png")},
                        data={k: str(v) for k, v in GREEDY.items()}).json()
        assert upload["caption"] == cap["caption"]
        questions = ["what is this?", "what color is it?", "is there a cat?"]
        ask = c.post("/v1/ask", json={"image": url, "questions": questions, **GREEDY}).json()
        assert ask["answers"] == library.ask(IMAGES[0], questions, **GREEDY)
        itm = c.post("/v1/itm", json={"image": url, "texts": ["a red circle", "a dog"]}).json()["results"]
        probs = library.itm(IMAGES[0], ["a red circle", "a dog"])
        np.testing.assert_allclose([r["match"] for r in itm], probs, atol=1e-5)
        sims = library.similarity([IMAGES[0]], ["a red circle", "a dog"])[0].tolist()
        np.testing.assert_allclose([r["similarity"] for r in itm], sims, atol=1e-5)
        ret = c.post("/v1/retrieve", json={"text": "a red circle", "images": [data_url(i) for i in IMAGES[:4]],
                                           "k": 3}).json()["results"]
        hits = library.retrieve("a red circle", IMAGES[:4], k=3)[0]
        assert [r["index"] for r in ret] == [h.index for h in hits]


def test_routes_the_model_cannot_serve_say_what_it_needs(tmp_path):
    tm.save_retrieval_model(tmp_path / "itm")
    srv = Server(tmp_path / "itm")
    try:
        r = httpx.post(srv.url + "/v1/caption", json={"image": data_url(IMAGES[0])})
        assert r.status_code == 400 and "stage-2 checkpoint" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/itm", json={"image": data_url(IMAGES[0]), "texts": ["a cat"]})
        assert r.status_code == 200
    finally:
        assert srv.stop() == 0


# ------------------------------------------------------------------------------------------ batching


def test_32_concurrent_requests_equal_their_lone_answers(client, server, library):
    questions = ["what is this?", "what color is it?", "is there a cat?", "what shape is this?"]
    jobs = [(IMAGES[i % len(IMAGES)], questions[i % len(questions)]) for i in range(32)]
    urls = {id(img): data_url(img) for img, _ in jobs}
    before = metric(server, "blip2_batch_size_sum"), metric(server, "blip2_batch_size_count")

    def one(job):
        img, q = job
        out = client.chat.completions.create(messages=[user(urls[id(img)], q)], model=_model(client), max_tokens=8)
        return out.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, jobs))
    expected = [library.ask(img, q, **GREEDY)[0] for img, q in jobs]  # one at a time
    assert answers == expected
    rows = metric(server, "blip2_batch_size_sum") - before[0]
    batches = metric(server, "blip2_batch_size_count") - before[1]
    assert rows == 32 and batches < 32  # requests shared forward passes


# ------------------------------------------------------------------------------------------ errors


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with almost no data: decoding it would be the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "no image"),
    ({"messages": [user("data:text/plain;base64,aGk=", "hi")]}, 400, "image"),
    ({"messages": [user("https://example.com/a.png", "hi")]}, 400, "--allowed-media-domains"),
    ({"messages": [user("/etc/passwd", "hi")]}, 400, ""),
    ({"messages": [user("data:image/png;base64," + base64.b64encode(_bomb_png(20000, 20000)).decode(), "hi")]},
     400, "pixels"),
    ({"messages": [user("IMG", "hi")], "n": 2}, 400, "n must be 1"),
    ({"messages": [user("IMG", "hi")], "max_tokens": 10_000}, 400, "max_new_tokens"),
    ({"messages": [user("IMG", "hi")], "num_beams": 50}, 400, "num_beams"),
    ({"messages": [user("IMG", "what " * 300)]}, 400, "tokens"),
    ({"messages": [user("IMG", "hi")], "bogus": 1}, 400, "unknown field"),
    ({"messages": [user("IMG", "hi")], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [user("IMG", "hi")], "model": "gpt-4o"}, 404, "does not exist"),
    ({"messages": [{"role": "assistant", "content": "hi"}, user("IMG", "a")], "stop": ["a"] * 5}, 400, "stop"),
])
def test_bad_requests_get_clear_4xx(server, body, status, needle):
    body = json.loads(json.dumps(body).replace('"IMG"', json.dumps(data_url(IMAGES[0]))))
    with http(server) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert needle.lower() in err["message"].lower() and err["type"] and err["code"] == status
        assert c.get("/health").status_code == 200  # still serving


def test_malformed_oversized_and_unauthorized(server):
    with http(server) as c:
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = c.post("/v1/caption", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/caption", content=b"hello", headers={"content-type": "text/plain"})
        assert r.status_code == 415
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert metric(server, "blip2_requests_total", route="/v1/caption", status="413") >= 1


def test_openai_client_errors_are_typed(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(messages=[user(data_url(IMAGES[0]), "hi")], model=_model(client), n=3)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_client_that_leaves_mid_stream_stops_costing_compute(server):
    before = metric(server, "blip2_cancelled_total")
    body = {"messages": [user(data_url(IMAGES[4]), "what is this?")], "stream": True, "max_tokens": 100,
            "min_tokens": 100}
    with http(server) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first chunk
    deadline = time.monotonic() + 30
    while metric(server, "blip2_cancelled_total") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "blip2_cancelled_total") > before


def test_queue_limit_and_time_limit(model_dir, server):
    body = {"image": data_url(IMAGES[0]), "num_beams": 4, "max_new_tokens": 110, "min_new_tokens": 110}
    # The time limit is set from this machine's own speed: 1.5 x one such request alone. The last of the 3 queued
    # requests waits for 3 others and its own run (>= 4 x), so it times out however fast or slow the machine is.
    with http(server) as c:
        c.post("/v1/caption", json=body)  # the image's features cached, as they will be below after the first
        start = time.perf_counter()
        assert c.post("/v1/caption", json=body).status_code == 200
        alone = time.perf_counter() - start
    srv = Server(model_dir, "--max-batch-size", "1", "--max-queue", "3", "--request-timeout", f"{1.5 * alone:.3f}")
    try:

        def one(_):
            return httpx.post(srv.url + "/v1/caption", json=body, timeout=60)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert 503 in codes and 504 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] and "queue" in busy.json()["error"]["message"]
        assert set(codes) <= {200, 503, 504}
        deadline = time.monotonic() + 30  # the jobs that timed out are dropped; wait for the one running
        while metric(srv, "blip2_queue_depth") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2 * alone)
        codes = [httpx.post(srv.url + "/v1/caption", json={"image": data_url(IMAGES[0]), **GREEDY}, timeout=60)
                 .status_code for _ in range(3)]
        assert 200 in codes and set(codes) <= {200, 504}, codes  # still serving (a load spike may cost one 504)
    finally:
        assert srv.stop() == 0


def test_no_request_produced_a_500(server):
    text = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in text
    assert "blip2_queue_depth" in text and "blip2_request_latency_seconds_bucket" in text


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_every_llm_kind_serves_chat_and_streams(tmp_path, kind):
    import blip2

    tm.save_generation_model(tmp_path / kind, kind)
    lib = blip2.load(str(tmp_path / kind), device="cpu")
    srv = Server(tmp_path / kind)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [user(data_url(IMAGES[5]), "what is this?")]
        whole = client.chat.completions.create(messages=messages, model=_model(client), max_tokens=8)
        assert whole.choices[0].message.content == lib.ask(IMAGES[5], "what is this?", **GREEDY)[0]
        chunks = client.chat.completions.create(messages=messages, model=_model(client), max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/itm", files={"image": ("a.png", _png(IMAGES[5]), "image/png")},
                       data={"texts": ["a cat", "a dog"]})
            assert r.status_code == 400 and "matching heads" in r.json()["error"]["message"]
            r = c.post("/v1/embeddings", json={"input": "a cat"})
            assert r.status_code == 400
    finally:
        assert srv.stop() == 0


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_multipart_itm_and_ask(server, library):
    with http(server) as c:
        r = c.post("/v1/itm", files={"image": ("a.png", _png(IMAGES[1]), "image/png")},
                   data={"texts": ["a red circle", "a dog"]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([x["match"] for x in r.json()["results"]],
                                   library.itm(IMAGES[1], ["a red circle", "a dog"]), atol=1e-5)
        r = c.post("/v1/ask", files={"image": ("a.png", _png(IMAGES[1]), "image/png")},
                   data={"questions": ["what is this?"], **{k: str(v) for k, v in GREEDY.items()}})
        assert r.json()["answers"] == library.ask(IMAGES[1], ["what is this?"], **GREEDY)
        r = c.post("/v1/itm", files={"image": ("a.png", b"\x00" * 10, "image/png")}, data={"texts": ["x"]})
        assert r.status_code == 400


def test_search_route_over_a_photo_index(model_dir, library, tmp_path):
    from blip2.collections.index import update_index
    from blip2.collections.search import search

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(IMAGES):
        image.save(photos / f"{i}.png")
    update_index(library, tmp_path / "idx", [photos], workers=0, progress=False)
    expected = search(library, tmp_path / "idx", text="a red circle", k=3)
    srv = Server(model_dir, "--index", str(tmp_path / "idx"))
    try:
        r = httpx.post(srv.url + "/v1/search", json={"query": "a red circle", "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["path"] for d in data] == [h.path for h in expected]
        np.testing.assert_allclose([d["score"] for d in data], [h.score for h in expected], atol=1e-5)
        by_image = httpx.post(srv.url + "/v1/search", json={"image": data_url(IMAGES[2]), "k": 1}, timeout=60).json()
        assert by_image["data"][0]["path"].endswith("2.png")  # an indexed copy of the query comes first
        r = httpx.post(srv.url + "/v1/search", json={"query": "x", "k": 0}, timeout=60)
        assert r.status_code == 400 and "'k'" in r.json()["error"]["message"]
    finally:
        assert srv.stop() == 0
