"""The opt-in compiled decode (`blip2.load(..., compile_decode=True)`: a static key/value cache and a
torch.compile'd forward) gives the plain path's tokens on tiny random OPT and Llama, greedy and seeded sampling,
batched and left-padded, and really compiles; beam search and Flan-T5 are left to the plain path / refused."""

from __future__ import annotations

import pytest
import tiny_models as tm

import blip2

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["what color is this ?", "is it a big red circle on the square ?", "what ?"]


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_compiled_decode_gives_the_plain_tokens(tmp_path, kind):
    tm.save_generation_model(tmp_path / kind, kind, num_queries=4, seed=7)
    plain, compiled = blip2.load(tmp_path / kind), blip2.load(tmp_path / kind, compile_decode=True)
    images = tm.images(len(QUESTIONS), seed=3)
    greedy = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 6}
    assert compiled.ask(images, QUESTIONS, **greedy) == plain.ask(images, QUESTIONS, **greedy)
    assert hasattr(compiled.model.language_model, "_compiled_call"), "the forward was not compiled"
    assert not hasattr(plain.model.language_model, "_compiled_call")
    if kind == "llama":
        sampled = {"do_sample": True, "top_k": 0, "seed": 5, "max_new_tokens": 5, "num_beams": 1}
        assert compiled.caption(images, **sampled) == plain.caption(images, **sampled)
        beams = {"num_beams": 3, "max_new_tokens": 4}  # not compiled: the plain path, same tokens
        assert compiled.caption(images[:2], **beams) == plain.caption(images[:2], **beams)


def test_compiled_decode_refuses_encoder_decoder_llms(tmp_path):
    tm.save_generation_model(tmp_path / "t5", "t5", num_queries=4, seed=7)
    with pytest.raises(ValueError, match="decoder-only"):
        blip2.load(tmp_path / "t5", compile_decode=True)


def test_cli_compile_decode_flag(tmp_path, capsys):
    """`blip2 caption --compile-decode` answers as the plain command does."""
    from blip2.cli import main

    tm.save_generation_model(tmp_path / "opt", "opt", num_queries=4, seed=7)
    image = tmp_path / "img.png"
    tm.images(1, seed=3)[0].save(image)
    args = ["caption", str(image), "--model", str(tmp_path / "opt"), "--num-beams", "1", "--max-new-tokens", "4"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--compile-decode"])
    assert capsys.readouterr().out == plain and plain.strip()
