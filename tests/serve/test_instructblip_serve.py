"""`blip2 serve` over a tiny transformers InstructBLIP checkpoint: the chat completion, /v1/ask and a prompted
/v1/caption answer what `Blip2.ask` / `Blip2.caption` answer (the instruction reaches the Q-Former and, as it
is, the LLM)."""

from __future__ import annotations

import httpx
import pytest
import tiny_models as tm
from live import Server, data_url

import blip2

openai = pytest.importorskip("openai")

GREEDY = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 0}
IMAGES = tm.images(2, seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random InstructBLIP (OPT LLM) saved by transformers, with both tokenizers, as hub folders are."""
    folder = tmp_path_factory.mktemp("instructblip-serve")
    tm.save_instructblip_model(folder, "opt", num_queries=4, cross_freq=1, seed=3)
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--max-wait-ms", "20")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr[-30:])
    assert not any("Traceback" in line for line in srv.stderr), "".join(srv.stderr[-60:])


def test_chat_ask_and_caption_equal_the_library(server, model_dir):
    library = blip2.load(model_dir, device="cpu")
    assert library.model.config.question_to_qformer and library.question_template == "{}"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    url = data_url(IMAGES[0])
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what color is the circle ?"}]}]
    out = client.chat.completions.create(messages=messages, model=str(model_dir), max_tokens=6)
    assert out.choices[0].message.content == library.ask(IMAGES[0], "what color is the circle ?", **GREEDY)[0]
    # The LLM read the instruction alone (no "Question: ... Answer:"): [BOS] + its 6 words after the queries.
    assert out.usage.prompt_tokens == library.model.num_queries + 1 + 6
    with httpx.Client(base_url=server.url, timeout=60) as c:
        questions = ["what shape is it ?", "is it red ?"]
        asked = c.post("/v1/ask", json={"image": url, "questions": questions, **GREEDY}).json()
        assert asked["answers"] == library.ask(IMAGES[0], questions, **GREEDY)
        second = data_url(IMAGES[1])
        cap = c.post("/v1/caption", json={"image": second, "prompt": "a photo of", **GREEDY}).json()
        assert cap["caption"] == library.caption(IMAGES[1], prompt="a photo of", **GREEDY)[0]
