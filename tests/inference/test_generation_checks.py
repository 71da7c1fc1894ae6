"""Generation settings and prompt lengths fail at once with one clear ValueError (issue 10): in the pure
checks the server imports, through `Blip2.caption/ask/chat` on tiny random models, and on the command line."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import tiny_models as tm
import torch

import blip2
from blip2 import cli
from blip2.data.text import tokenize_prompts
from blip2.inference.generation import (
    check_generation,
    check_max_prompt_tokens,
    check_prompt_length,
    llm_context,
    prompt_budget,
)
from blip2.inference.pipeline import CAPTION_DEFAULTS, VQA_DEFAULTS, Blip2
from blip2.models.blip2 import Blip2Model

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 128  # tiny OPT's max_position_embeddings (tests/tiny_models.py)
QUERIES = 4
FAST = {"num_beams": 1, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tm.save_generation_model(root / "opt", "opt", num_queries=QUERIES)
    tm.save_generation_model(root / "t5", "t5", num_queries=QUERIES)
    tm.images(1)[0].save(root / "img.png")
    return root


@pytest.fixture(scope="module")
def opt(folders) -> Blip2:
    return blip2.load(folders / "opt")


@pytest.fixture
def no_compute(opt, monkeypatch):
    """Any image encoding or generation fails the test: the checks must run before both."""

    def forbidden(*args, **kwargs):
        raise AssertionError("compute ran before the check")

    monkeypatch.setattr(opt, "encode_images", forbidden)
    monkeypatch.setattr(opt.model, "generate", forbidden)
    return opt


# ------------------------------------------------------------------------------------ the pure checks


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_beams": 0}, "num_beams must be an integer >= 1, got 0"),
        ({"num_beams": True}, "num_beams must be an integer >= 1, got True"),
        ({"num_beams": 2.0}, "num_beams must be an integer >= 1, got 2.0"),
        ({"num_beams": "5"}, "num_beams must be an integer >= 1, got '5'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"min_new_tokens": -1}, "min_new_tokens must be an integer >= 0, got -1"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens must be <= max_new_tokens (2), got 5"),
        ({"length_penalty": math.inf}, "length_penalty must be a finite number, got inf"),
        ({"length_penalty": None}, "length_penalty must be a finite number, got None"),
        ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0, got 0.0"),
        ({"temperature": 0}, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": math.nan}, "temperature must be a finite number > 0, got nan"),
        ({"top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
        ({"top_k": -1}, "top_k must be an integer >= 0 (0: no top-k filter), got -1"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be an integer >= 0 (0: off), got -2"),
        ({"do_sample": 1}, "do_sample must be True or False, got 1"),
        ({"seed": -1}, "seed must be an integer in [0, 2**64), got -1"),
        ({"seed": 2**64}, "seed must be an integer in [0, 2**64)"),
        ({"num_beam": 3}, "unknown generation setting 'num_beam' (known: num_beams, "),
        ({"num_return_sequences": 2}, "unknown generation setting 'num_return_sequences'"),
    ],
)
def test_a_bad_setting_is_one_value_error_naming_it(settings, message):
    with pytest.raises(ValueError) as err:
        check_generation(settings)
    assert str(err.value).startswith(message), str(err.value)


def test_good_settings_come_back_as_plain_python_types():
    given = {"num_beams": np.int64(3), "max_new_tokens": 7, "min_new_tokens": 0, "length_penalty": -1,
             "repetition_penalty": np.float32(1.5), "temperature": 1, "top_p": 1, "top_k": 0,
             "no_repeat_ngram_size": 2, "do_sample": False, "seed": 2**64 - 1}
    out = check_generation(given)
    assert out == given and out is not given
    assert type(out["num_beams"]) is int and type(out["repetition_penalty"]) is float
    assert type(out["length_penalty"]) is float and type(out["temperature"]) is float


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_max_prompt_tokens_itself_is_checked(bad):
    assert check_max_prompt_tokens(None) is None and check_max_prompt_tokens(np.int32(9)) == 9
    with pytest.raises(ValueError, match=r"^max_prompt_tokens must be an integer >= 1 or None"):
        check_max_prompt_tokens(bad)


def test_llm_context_per_family():
    from transformers import GPT2Config, T5Config

    assert llm_context(tm.text_config("opt"), False) == CONTEXT
    assert llm_context(GPT2Config(n_positions=300), False) == 300
    assert llm_context(T5Config(), True) == 512
    assert llm_context(object(), False) == 2048


def test_prompt_length_message_names_the_counts():
    with pytest.raises(ValueError) as err:
        check_prompt_length(5002, 32, 10, 2048)
    assert str(err.value) == (
        "prompt is 5002 tokens; with the 32-token image prompt and max_new_tokens=10 that is 5044 tokens, "
        "longer than the model's context of 2048 tokens: shorten it or lower max_new_tokens"
    )
    check_prompt_length(2006, 32, 10, 2048)  # exactly full
    with pytest.raises(ValueError, match=r"^prompt is 2007 tokens; .* that is 2049 tokens"):
        check_prompt_length(2007, 32, 10, 2048)
    # encoder-decoder: the answer is the decoder's, so max_new_tokens takes no encoder position
    check_prompt_length(480, 32, 1000, 512, is_encoder_decoder=True)
    enc_dec = r"^prompt is 481 tokens; with the 32-token image prompt that is 513 tokens, longer"
    with pytest.raises(ValueError, match=enc_dec):
        check_prompt_length(481, 32, 1000, 512, is_encoder_decoder=True)
    with pytest.raises(ValueError, match=r"^question 2 is 30 tokens, more than max_prompt_tokens=20"):
        check_prompt_length(30, 32, 10, 2048, max_prompt_tokens=20, what="question 2")
    assert prompt_budget(32, 10, 2048) == 2006 and prompt_budget(32, 10, 2048, max_prompt_tokens=20) == 20


# ------------------------------------------------------------------------------------ through Blip2


def _count(model: Blip2, prompt: str) -> int:
    return len(model.tokenizer(prompt)["input_ids"])


@pytest.mark.parametrize(
    "bad, name",
    [({"num_beams": 0}, "num_beams"), ({"top_p": 1.5}, "top_p"), ({"temperature": 0}, "temperature"),
     ({"min_new_tokens": 4, "max_new_tokens": 3}, "min_new_tokens"),
     ({"max_new_tokens": "3"}, "max_new_tokens"),
     ({"num_beams": 2.5}, "num_beams"), ({"sampling": True}, "sampling")],
)
def test_caption_ask_chat_reject_bad_settings_before_any_compute(no_compute, folders, bad, name):
    image = str(folders / "img.png")
    calls = [lambda: no_compute.caption(image, **bad), lambda: no_compute.ask(image, "what ?", **bad),
             lambda: no_compute.chat(image, **bad)]
    for call in calls:
        with pytest.raises(ValueError, match=name):
            call()


def test_issue_num_beams_zero_is_no_longer_a_zero_division(opt):
    with pytest.raises(ValueError, match=r"^num_beams must be an integer >= 1, got 0$"):
        opt.caption(tm.images(1)[0], num_beams=0)


def test_a_prompt_over_the_context_fails_before_any_compute(no_compute, folders):
    question = "what " * 200
    prompt = f"Question: {question} Answer:"
    n = _count(no_compute, prompt)
    assert n > 200
    with pytest.raises(ValueError) as err:
        no_compute.ask(str(folders / "img.png"), question)
    assert str(err.value) == (
        f"prompt is {n} tokens; with the {QUERIES}-token image prompt and max_new_tokens=10 that is "
        f"{n + QUERIES + 10} tokens, longer than the model's context of {CONTEXT} tokens: shorten it or "
        "lower max_new_tokens"
    )
    with pytest.raises(ValueError, match=r"^prompt is 201 tokens; .*max_new_tokens=30 "):
        no_compute.caption(str(folders / "img.png"), prompt="a " * 200)


def test_ask_checks_every_question_before_answering_any(no_compute, folders):
    questions = ["what color is this ?", "what " * 150, "is it red ?"]
    with pytest.raises(ValueError, match=r"^prompt 2 of 3 is \d+ tokens; "):
        no_compute.ask(str(folders / "img.png"), questions, num_beams=1)


def test_the_budget_is_exact(opt):
    image = tm.images(1)[0]
    budget = CONTEXT - QUERIES - 3  # max_new_tokens=3
    fits = "a " * (budget - 1)  # + the BOS token
    assert _count(opt, fits) == budget
    assert len(opt.caption(image, prompt=fits, **FAST)) == 1
    with pytest.raises(ValueError, match=rf"^prompt is {budget + 1} tokens"):
        opt.caption(image, prompt=fits + "a", **FAST)


def test_max_prompt_tokens_fails_before_any_compute(no_compute, folders):
    image = str(folders / "img.png")
    n = _count(no_compute, "Question: what color is this ? Answer:")
    with pytest.raises(ValueError, match=rf"^prompt is {n} tokens, more than max_prompt_tokens={n - 1}: "):
        no_compute.ask(image, "what color is this ?", max_prompt_tokens=n - 1)
    with pytest.raises(ValueError, match=r"more than max_prompt_tokens=2"):
        no_compute.caption(image, prompt="a photo of", max_prompt_tokens=2)
    with pytest.raises(ValueError, match=r"^max_prompt_tokens must be"):
        no_compute.caption(image, max_prompt_tokens=0)
    with pytest.raises(ValueError, match=r"^max_prompt_tokens must be"):
        Blip2(no_compute.model, no_compute.tokenizer, max_prompt_tokens=-1)


def test_max_prompt_tokens_per_call_and_as_the_default(opt, folders):
    image = str(folders / "img.png")
    n = _count(opt, "Question: what color is this ? Answer:")
    capped = Blip2(opt.model, opt.tokenizer, max_prompt_tokens=n - 1)
    with pytest.raises(ValueError, match=rf"more than max_prompt_tokens={n - 1}"):
        capped.ask(image, "what color is this ?", **FAST)
    # A call's own cap replaces the default one, both ways.
    assert capped.ask(image, "what color is this ?", max_prompt_tokens=n, **FAST) == opt.ask(
        image, "what color is this ?", **FAST
    )
    with pytest.raises(ValueError, match=r"more than max_prompt_tokens=3"):
        opt.ask(image, "what color is this ?", max_prompt_tokens=3, **FAST)
    assert capped.check_prompts(["a photo of", ""], 3, max_prompt_tokens=100) == [4, 1]


@pytest.mark.filterwarnings("ignore:Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`")
def test_valid_settings_give_the_same_tokens_as_generate_itself(opt):
    images = tm.images(2, seed=4)
    settings = {"num_beams": 3, "max_new_tokens": 6, "min_new_tokens": 2, "length_penalty": 0.5,
                "repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    texts = opt.caption(images, prompt="a photo of", **settings)
    tokens = tokenize_prompts(opt.tokenizer, ["a photo of"] * 2, left_pad=True)
    with torch.no_grad():
        ids = opt.model.generate(opt.model.encode_image(opt.images(images)), tokens.input_ids,
                                 tokens.attention_mask, pad_token_id=opt.tokenizer.pad_token_id, **settings)
    assert texts == opt._decode(ids)
    numpy_settings = {k: (np.int64(v) if isinstance(v, int) else np.float64(v)) for k, v in settings.items()}
    assert opt.caption(images, prompt="a photo of", **numpy_settings) == texts


def test_length_penalty_reaches_beam_search_whatever_do_sample_says(opt):
    assert opt._generation(VQA_DEFAULTS, {"do_sample": False})["length_penalty"] == -1.0
    assert opt._generation(VQA_DEFAULTS, {"do_sample": True})["length_penalty"] == -1.0
    assert "length_penalty" not in opt._generation(VQA_DEFAULTS, {"num_beams": 1})
    assert opt._generation(CAPTION_DEFAULTS, {"max_new_tokens": None})["max_new_tokens"] == 30  # None: unset


def test_a_seed_repeats_sampling_and_leaves_the_global_rng_alone(opt):
    image = tm.images(1)[0]
    settings = {"do_sample": True, "num_beams": 1, "max_new_tokens": 8, "temperature": 2.0, "seed": 7}
    state = torch.get_rng_state()
    first = opt.caption([image] * 3, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert opt.caption([image] * 3, **settings) == first
    draws = {tuple(opt.caption([image] * 3, **{**settings, "seed": s})) for s in range(3)}
    assert len(draws) > 1  # the seed does reach the sampler


def test_encoder_decoder_context_is_the_encoder_input(folders):
    t5 = blip2.load(folders / "t5")
    assert t5.llm_context == 512
    room = 512 - QUERIES
    fits = "a " * (room - 1)  # + </s>
    assert t5.check_prompts([fits], max_new_tokens=1000) == [room]
    message = (rf"^prompt is {room + 1} tokens; with the {QUERIES}-token image prompt that is 513 tokens, "
               r"longer than the model's context of 512 tokens \(the LLM encoder's input\)")
    with pytest.raises(ValueError, match=message):
        t5.check_prompts([fits + "a"], max_new_tokens=1)


# ------------------------------------------------------------------------------------------- chat


def test_chat_drops_oldest_turns_with_a_warning_and_refuses_one_that_cannot_fit(opt):
    session = opt.chat(tm.images(1)[0], **FAST)
    long_question = " ".join(["what color is the circle ?"] * 6)  # ~38 tokens a turn: 128 positions hold 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            session.ask(long_question)
    dropped = [w for w in caught if str(w.message).startswith("chat context full: dropped the oldest turn")]
    assert session.dropped_turns >= 1 and len(dropped) == session.dropped_turns
    kept = len(session.history)

    too_long = "what " * 200
    n = _count(opt, f"Question: {too_long} Answer:")
    with pytest.raises(ValueError) as err:
        session.ask(too_long)
    assert str(err.value).startswith(
        f"the question's prompt alone is {n} tokens; with the {QUERIES}-token image prompt and "
        f"max_new_tokens=3 that is {n + QUERIES + 3} tokens, longer than the model's context of "
        f"{CONTEXT} tokens"
    )
    assert len(session.history) == kept and kept >= 1  # refused before any turn was dropped for it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session.ask("is it red ?")
    assert len(session.history) >= 2


def test_chat_keeps_its_prompts_within_max_prompt_tokens(opt):
    question = "what color is the circle ?"
    one_turn = _count(opt, f"Question: {question} Answer:")
    session = opt.chat(tm.images(1)[0], max_prompt_tokens=one_turn + 3, **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            session.ask(question)
    assert session.dropped_turns == 2 and len(caught) == 2  # only the current turn fits each time
    with pytest.raises(ValueError, match=r"^the question's prompt alone is \d+ tokens, more than max_prompt"):
        session.ask(question + " is it red ?")


# --------------------------------------------------------------------------------- Q-Former text side


def test_a_long_question_is_cut_to_the_qformer_position_table():
    base = tm.our_config("opt", num_queries=QUERIES)
    qformer = dataclasses.replace(base.qformer, use_text_input=True, max_position_embeddings=16)
    config = dataclasses.replace(base, qformer=qformer, question_to_qformer=True)
    torch.manual_seed(0)
    model = Blip2(Blip2Model(config), tm.word_tokenizer("opt"), tm.word_tokenizer("bert"))
    words = ("what color is the circle on the picture " * 8).split()  # 64 words: past 16 positions and 35
    feats = model.encode_images(tm.images(1))
    cut = " ".join(words[:14])  # [CLS] + 14 words + [SEP] = 16 positions
    assert torch.equal(model.soft_prompts(feats, [" ".join(words)]), model.soft_prompts(feats, [cut]))
    assert len(model.ask(tm.images(1)[0], " ".join(words), **FAST)) == 1


# ------------------------------------------------------------------------------------------------ CLI


def _one_error_line(capsys, argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("blip2: error: ") and "Traceback" not in err, err
    return code, lines[0]


def test_cli_bad_settings_and_long_questions_are_one_line(folders, capsys):
    image, model = folders / "img.png", ["-m", folders / "opt"]
    code, line = _one_error_line(capsys, ["caption", image, *model, "--num-beams", "0"])
    assert code == cli.EXIT_USAGE and "--num-beams" in line
    argv = ["caption", image, *model, "--min-new-tokens", "5", "--max-new-tokens", "2"]
    code, line = _one_error_line(capsys, argv)
    assert code == cli.EXIT_ERROR and "min_new_tokens must be <= max_new_tokens (2), got 5" in line
    code, line = _one_error_line(capsys, ["ask", image, "what " * 200, *model])
    assert code == cli.EXIT_ERROR
    assert f"with the {QUERIES}-token image prompt and max_new_tokens=10" in line
    assert f"longer than the model's context of {CONTEXT} tokens" in line
