"""Stage-2 text batches: the prompt and the padding never trained, the target and its EOS always (REFERENCE §3)."""

from __future__ import annotations

import random

import tiny_models as tm
from blip2.data.collate import IGNORE, decoder_only_batch, encoder_decoder_batch, split_caption


def test_decoder_only_masks_prompt_and_padding():
    tok = tm.word_tokenizer("opt")
    b = decoder_only_batch(tok, ["question : what color ? answer :", "a photo of"], ["red", "a red circle"])
    ids = b.input_ids.tolist()
    prompt0 = tok("question : what color ? answer :")["input_ids"]
    assert prompt0[0] == tok.bos_token_id and ids[0][: len(prompt0)] == prompt0
    red = tok.convert_tokens_to_ids("red")
    eos = tok.eos_token_id
    assert ids[0][len(prompt0) :] == [red, eos]
    labels = b.labels.tolist()
    assert labels[0] == [IGNORE] * len(prompt0) + [red, eos]
    assert labels[1] == [IGNORE] * 4 + tok("a red circle", add_special_tokens=False)["input_ids"] + [eos] + [IGNORE] * 2
    assert b.attention_mask.tolist()[1] == [1] * 8 + [0] * 2
    assert b.input_ids[1, -1] == tok.pad_token_id


def test_empty_prompt_trains_the_bos_as_lavis_does():
    tok = tm.word_tokenizer("opt")
    b = decoder_only_batch(tok, [""], ["a cat"], append_eos=False)
    assert b.input_ids.tolist() == [[tok.bos_token_id] + tok("a cat", add_special_tokens=False)["input_ids"]]
    assert b.labels.tolist() == b.input_ids.tolist()


def test_decoder_only_truncates_the_target():
    tok = tm.word_tokenizer("opt")
    b = decoder_only_batch(tok, ["a photo of"], ["a red circle on a blue square"], max_length=6)
    assert b.input_ids.shape == (1, 6) and (b.labels[0, :4] == IGNORE).all()


def test_encoder_decoder_batch():
    tok = tm.word_tokenizer("t5")
    b = encoder_decoder_batch(tok, ["question : what color ?", "a photo of"], ["red", "a red circle"])
    assert b.input_ids[0].tolist() == tok("question : what color ?")["input_ids"]  # ends with </s>
    assert b.labels.tolist() == [[tok.convert_tokens_to_ids("red"), 1, IGNORE, IGNORE],
                                 tok("a red circle")["input_ids"]]
    assert b.decoder_attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_split_caption_cuts_between_one_word_and_the_middle():
    rng = random.Random(0)
    for _ in range(50):
        prefix, suffix = split_caption("one two three four five six", rng)
        assert 1 <= len(prefix.split()) <= 3 and f"{prefix} {suffix}" == "one two three four five six"
    assert split_caption("word", rng) == ("", "word")
