"""`blip2 …` on tiny random checkpoints: every command in-process through `main(argv)`, the errors people
make (one `blip2: error:` line, non-zero exit, no traceback), and the instant `--help` in a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm

from blip2 import cli
from blip2.inference.pipeline import Blip2

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["--num-beams", "1", "--max-new-tokens", "3"]  # tiny models need no beams


def _blip2_command() -> list[str]:
    script = Path(sys.executable).parent / "blip2"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blip2.cli"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    tm.save_generation_model(root / "opt", "opt")
    tm.save_retrieval_model(root / "itm")
    (root / "images").mkdir()
    for i, image in enumerate(tm.images(3)):
        image.save(root / "images" / f"{i}.png")
    (root / "images" / "notes.txt").write_text("not an image, skipped by suffix")
    (root / "x.png").write_bytes(b"\x00garbage, not a png\xff" * 8)
    return {
        "root": root, "opt": root / "opt", "itm": root / "itm", "garbage": root / "x.png",
        "dir": root / "images", "img": root / "images" / "0.png", "img1": root / "images" / "1.png",
    }


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if "blip2: error:" in line]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("blip2: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -------------------------------------------------------------------------------------------- help


def test_import_and_help_do_not_load_torch():
    code = (
        "import sys\n"
        "from blip2.cli import main\n"
        "for argv in (['--help'], ['caption', '--help'], ['convert', '--help']):\n"
        "    assert main(argv) == 0\n"
        "heavy = ('torch', 'transformers', 'numpy', 'PIL', 'blip2.inference')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_entry_point_help():
    for argv in (["--help"], ["caption", "--help"], ["convert", "--help"]):
        done = subprocess.run(_blip2_command() + argv, capture_output=True, text=True, env=ENV, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: blip2")


def test_every_command_and_option_has_help(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0]
    assert set(commands.choices) == {"caption", "ask", "chat", "itm", "retrieve", "eval", "train", "cache-features", "convert", "serve", "index", "search", "label"}
    described = {a.dest: a.help for a in commands._choices_actions}
    for name, sub in commands.choices.items():
        assert described[name], name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert cli.main([name, "--help"]) == 0
        assert f"usage: blip2 {name}" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- the commands


def test_caption_text_and_json(files, capsys):
    code, out, _ = run(capsys, "caption", files["img"], files["img1"], "--model", files["opt"], *FAST)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{files['img']}: ") and lines[1].startswith(f"{files['img1']}: ")

    code, out, _ = run(capsys, "caption", files["img"], files["img1"], "-m", files["opt"], "--json",
                       "--prompt", "a photo of", "--batch-size", "1", *FAST)
    assert code == 0
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [str(files["img"]), str(files["img1"])]
    assert all(isinstance(r["caption"], str) for r in rows)


def test_only_given_generation_flags_reach_the_library(files, capsys, monkeypatch):
    seen = []

    def spy(self, images, prompt=None, **generation):
        seen.append(generation)
        return ["a caption"] * len(images)

    monkeypatch.setattr(Blip2, "caption", spy)
    assert run(capsys, "caption", files["img"], "-m", files["opt"])[0] == 0
    assert seen[-1] == {}
    argv = ["--num-beams", "2", "--max-new-tokens", "4", "--min-new-tokens", "0", "--length-penalty", "0.5",
            "--repetition-penalty", "1.2", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "0",
            "--seed", str(2**64 - 1), "--sample"]
    assert run(capsys, "caption", files["img"], "-m", files["opt"], *argv)[0] == 0
    assert seen[-1] == {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 0, "length_penalty": 0.5,
                        "repetition_penalty": 1.2, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                        "seed": 2**64 - 1, "do_sample": True}


def test_seeded_sampling_repeats_its_text(files, capsys, monkeypatch):
    """--sample --seed N gives the same text on every run (caption, ask and chat); other seeds are free to
    differ, and a high temperature over all tokens (--top-k 0) makes differing texts near certain."""
    sample = ["--sample", "--num-beams", "1", "--max-new-tokens", "8", "--min-new-tokens", "8",
              "--temperature", "5", "--top-k", "0"]
    caption = ["caption", files["img"], files["img1"], "-m", files["opt"], "--json", *sample]
    texts = [run(capsys, *caption, "--seed", seed)[1] for seed in ("7", "7", "8")]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert len({r["caption"] for r in json.loads(texts[0])}) == 2  # the seed is per call, not per image
    ask = ["ask", files["img"], "what is it ?", "-m", files["opt"], *sample, "--seed", "3"]
    assert run(capsys, *ask)[1] == run(capsys, *ask)[1]
    chat = ["chat", files["img"], "-m", files["opt"], *sample, "--seed", "3"]
    answers = []
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.StringIO("what is it ?\nand the color ?\n"))
        answers.append(run(capsys, *chat)[1])
    assert answers[0] == answers[1] and len(answers[0].splitlines()) == 2
    top = ["caption", files["img"], "-m", files["opt"], *sample[:-2], "--top-k", "1"]
    assert run(capsys, *top, "--seed", "1")[1] == run(capsys, *top, "--seed", "2")[1]  # top-1 sampling is greedy


def test_ask_one_and_several_questions(files, capsys):
    code, out, _ = run(capsys, "ask", files["img"], "what color is this ?", "-m", files["opt"], *FAST)
    assert code == 0 and len(out.splitlines()) <= 1  # just the answer (may be empty on random weights)

    code, out, _ = run(capsys, "ask", files["img"], "what color ?", "what shape ?", "-m", files["opt"],
                       "--json", "--template", "Question: {} Short answer:", *FAST)
    assert code == 0
    rows = json.loads(out)
    assert [r["question"] for r in rows] == ["what color ?", "what shape ?"]
    assert all(r["image"] == str(files["img"]) and isinstance(r["answer"], str) for r in rows)


def test_ask_template_needs_a_slot(files, capsys):
    code, _, err = run(capsys, "ask", files["img"], "what ?", "-m", files["opt"], "--template", "A: {name}")
    assert_clean_error(code, err, "--template")


def _chat(capsys, monkeypatch, files, lines: list[str], *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    return run(capsys, "chat", files["img"], "-m", files["opt"], "--json", *FAST, *extra)


def test_chat_reads_stdin_until_quit(files, capsys, monkeypatch):
    lines = ["what is this ?", "", "/reset", "is it red ?", "/quit", "never asked ?"]
    code, out, err = _chat(capsys, monkeypatch, files, lines)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in rows] == ["what is this ?", "is it red ?"]
    assert "you>" not in out  # no prompt when stdin is not a terminal
    assert "conversation cleared" in err


def test_chat_without_json_prints_one_answer_per_line(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what ?\nwhere ?\n"))  # ends at EOF, no /quit
    code, out, _ = run(capsys, "chat", files["img"], "-m", files["opt"], *FAST)
    assert code == 0 and out.count("\n") == 2


def test_chat_in_a_terminal_prompts_and_labels_answers(files, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("what is this ?\n"))  # input() reads it; EOF ends the chat
    code, out, err = run(capsys, "chat", files["img"], "-m", files["opt"], *FAST)
    assert code == 0
    assert out.startswith("you> blip2> ") and out.count("you> ") == 2
    assert "/reset" in err  # the greeting says how to leave and reset


def test_chat_notes_dropped_turns_and_survives_a_too_long_question(files, capsys, monkeypatch):
    long_question = " ".join(["what color is the circle ?"] * 6)  # ~36 tokens: 3 turns overflow 128 positions
    too_long = " ".join(["what"] * 200)
    code, out, err = _chat(capsys, monkeypatch, files, [long_question] * 4 + [too_long, "is it red ?"])
    assert len(out.splitlines()) == 5  # every question but the too-long one got an answer
    assert "blip2: note: chat context full: dropped the oldest turn" in err
    assert_clean_error(code, err, "longer than the model's context")


def test_itm_scores_each_text(files, capsys):
    code, out, _ = run(capsys, "itm", files["img"], "a red circle", "a blue square", "-m", files["itm"],
                       "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["text"] for r in rows] == ["a red circle", "a blue square"]
    assert all(0.0 <= r["itm"] <= 1.0 and -1.0 <= r["itc"] <= 1.0 for r in rows)

    code, out, _ = run(capsys, "itm", files["img"], "a red circle", "-m", files["itm"])
    assert code == 0 and out.startswith("a red circle: match ")


def test_retrieve_from_a_directory(files, capsys):
    code, out, _ = run(capsys, "retrieve", "a red circle", "a dog", "--images", files["dir"], "-k", "2",
                       "-m", files["itm"], "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 4 and [r["rank"] for r in rows] == [1, 2, 1, 2]
    known = {str(files["dir"] / f"{i}.png") for i in range(3)}
    assert {r["image"] for r in rows} <= known
    for text in ("a red circle", "a dog"):
        scores = [r["score"] for r in rows if r["text"] == text]
        assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= r["itm"] <= 1.0 and -1.0 <= r["itc"] <= 1.0 for r in rows)

    images = [str(files["img"]), str(files["img1"])]
    code, out, _ = run(capsys, "retrieve", "a cat", "--images", *images, "-m", files["itm"])
    assert code == 0
    lines = out.splitlines()
    assert sorted(line.split(": match ")[0] for line in lines) == sorted(images)
    assert all(" similarity " in line for line in lines)  # the ITM probability and ITC cosine, as `itm` shows


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["caption", "{root}/missing.png", "-m", "{opt}"], "does not exist"),
        (["caption", "{garbage}", "-m", "{opt}"], "not a readable image"),
        (["caption", "{dir}", "-m", "{opt}"], "is a directory"),
        (["caption", "{img}", "-m", "{root}/no-such-model"], "no checkpoint folder"),
        (["caption", "{img}", "-m", "{img}"], "is a file"),
        (["caption", "{img}", "-m", "{itm}"], "no language model"),
        (["chat", "{img}", "-m", "{itm}"], "no language model"),
        (["itm", "{img}", "a cat", "-m", "{opt}"], "no image-text matching heads"),
        (["retrieve", "a cat", "--images", "{root}/nowhere", "-m", "{itm}"], "does not exist"),
        (["retrieve", "a cat", "--images", "{opt}", "-m", "{itm}"], "no image files"),
        (["retrieve", "a cat", "--images", "{garbage}", "-m", "{itm}"], "not a readable image"),
        (["convert", "{root}/missing.pth", "{root}/out"], "does not exist"),
    ],
)
def test_user_mistakes_give_one_clear_line(files, capsys, argv, needle):
    code, out, err = run(capsys, *[a.format(**files) for a in argv])
    assert code == cli.EXIT_ERROR and out == ""
    assert_clean_error(code, err, needle)


def test_an_install_without_the_default_model_says_so(files, capsys, monkeypatch, tmp_path):
    from blip2.inference import registry

    monkeypatch.setattr(registry, "DEFAULT_DIR", tmp_path)  # e.g. a wheel built without src/blip2/default
    code, out, err = run(capsys, "caption", files["img"])
    assert code == cli.EXIT_ERROR and out == ""
    assert_clean_error(code, err, "default model is not bundled")


@pytest.mark.parametrize(
    "argv",
    [["caption"], ["caption", "{img}", "--num-beams", "0"], ["caption", "{img}", "--top-p", "2"],
     ["caption", "{img}", "--top-k", "-1"], ["ask", "{img}", "why ?", "--top-k", "2.5"],
     ["chat", "{img}", "--seed", "-1"], ["caption", "{img}", "--seed", str(2**64)], ["label", "{dir}", "--seed", "x"],
     ["caption", "{img}", "--device", "tpu"], ["frobnicate"], []],
)
def test_usage_mistakes_exit_2(files, capsys, argv):
    code, _, err = run(capsys, *[a.format(**files) for a in argv])
    assert code == cli.EXIT_USAGE
    assert_clean_error(code, err)


def test_a_bug_keeps_its_traceback(files, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(Blip2, "caption", broken)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        cli.main(["caption", str(files["img"]), "-m", str(files["opt"])])


def test_ctrl_c_exits_130(files, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Blip2, "caption", interrupted)
    code, _, err = run(capsys, "caption", files["img"], "-m", files["opt"])
    assert code == cli.EXIT_INTERRUPTED and "Traceback" not in err


def test_debug_shows_the_traceback(files, capsys):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "caption", str(files["img"]), "-m", str(files["root"] / "no-such-model")])


@pytest.mark.parametrize("which", ["garbage", "missing"])
def test_entry_point_errors_without_traceback(files, which):
    image = files["garbage"] if which == "garbage" else files["root"] / "missing.png"
    done = subprocess.run(_blip2_command() + ["caption", str(image), "-m", str(files["opt"])],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == cli.EXIT_ERROR
    assert_clean_error(done.returncode, done.stderr, str(image))


# ------------------------------------------------------------------------------- only results on success


def _bpe_tokenizer():
    """A character-level BPE tokenizer whose config asks for `clean_up_tokenization_spaces`, as SmolLM2's does
    (transformers 5 warns about that on decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: </s>=2 is BOS and EOS
    vocab = {t: i for i, t in enumerate(specials + ["▁"] + list("abcdefghijklmnopqrstuvwxyz?.,:"))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module")
def like_default(tmp_path_factory) -> dict[str, Path]:
    """Tiny files that take the default model's noisy paths: the model's LLM is a reference to a folder (loaded
    by transformers' from_pretrained, which draws a "Loading weights" bar), its tokenizer is BPE, it has the
    stage-1 heads too; plus a LAVIS .pth for `convert` and a VQA file for `eval`."""
    import dataclasses

    import torch

    from blip2.convert.checkpoint import init_model, save_model
    from blip2.convert.lavis import ours_to_lavis
    from blip2.models.config import LanguageConfig

    root = tmp_path_factory.mktemp("like-default")
    hf = tm.save_generation_model(root / "hf", "opt")
    hf.language_model.save_pretrained(root / "llm")
    cfg = tm.our_config(None)
    language = LanguageConfig(hf_config=tm.text_config("opt").to_dict(), pretrained=str(root / "llm"))
    model = init_model(dataclasses.replace(cfg, language=language))
    save_model(model, root / "model", tokenizer=_bpe_tokenizer(), qformer_tokenizer=tm.word_tokenizer("bert"))

    state = hf.state_dict()  # a released LAVIS stage-2 file: no frozen weights but the ViT's last LayerNorm
    trainable = {k: v for k, v in state.items() if not k.startswith(("language_model.", "vision_model."))}
    trainable |= {k: v for k, v in state.items() if k.startswith("vision_model.post_layernorm.")}
    torch.save({"model": ours_to_lavis(trainable, "blip2_opt", require_frozen=False)}, root / "blip2_opt.pth")

    (root / "images").mkdir()
    for i, image in enumerate(tm.images(3)):
        image.save(root / "images" / f"{i}.png")
    rows = [{"image": f"images/{i}.png", "question": "what color is it ?", "answers": ["red"]} for i in range(2)]
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": root / "model", "llm": root / "llm", "hf": root / "hf",
            "pth": root / "blip2_opt.pth", "dir": root / "images", "img": root / "images" / "0.png",
            "vqa": root / "vqa.jsonl"}


def _quiet_env() -> dict[str, str]:
    """The test run's environment without anything that would choose the libraries' verbosity for them."""
    chosen = (*cli.QUIET_ENV, "PYTHONWARNINGS")
    return {**{k: v for k, v in ENV.items() if k not in chosen}, "OMP_NUM_THREADS": "1"}


EVERY_COMMAND = {  # argv (formatted with like_default's paths) and stdin
    "caption": (["caption", "{img}", "-m", "{model}", *FAST], None),
    "ask": (["ask", "{img}", "what color is it ?", "is it red ?", "-m", "{model}", *FAST], None),
    "chat": (["chat", "{img}", "-m", "{model}", "--json", *FAST], "what is this ?\nis it red ?\n"),
    "itm": (["itm", "{img}", "a red circle", "a dog", "-m", "{model}"], None),
    "retrieve": (["retrieve", "a red circle", "--images", "{dir}", "-k", "2", "-m", "{model}"], None),
    "eval": (["eval", "vqa", "--data", "{vqa}", "--out", "{root}/eval", "-m", "{model}", *FAST], None),
    "convert": (["convert", "{pth}", "{root}/converted", "--llm", "{llm}", "--vision", "{hf}",
                 "--qformer-heads", "4"], None),
}


@pytest.mark.parametrize("command", EVERY_COMMAND)
def test_success_prints_results_and_nothing_on_stderr(like_default, command):
    argv, stdin = EVERY_COMMAND[command]
    done = subprocess.run(_blip2_command() + [a.format(**like_default) for a in argv], input=stdin,
                          capture_output=True, text=True, env=_quiet_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert done.stderr == ""


def test_verbose_lets_the_libraries_speak(like_default):
    argv = ["-v", "caption", str(like_default["img"]), "-m", str(like_default["model"]), *FAST]
    done = subprocess.run(_blip2_command() + argv, capture_output=True, text=True, env=_quiet_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Loading weights" in done.stderr  # transformers' own bar, as it loads the referenced LLM
    # Fixed where it starts (blip2.inference.pipeline._load_tokenizer), not only hidden: no warning even here.
    assert "clean_up_tokenization_spaces" not in done.stderr


@pytest.mark.parametrize("argv", [["-v", "caption", "x.png"], ["caption", "x.png", "-v"], ["caption", "x.png"],
                                  ["-v", "convert", "a", "b"], ["convert", "a", "b", "--verbose"],
                                  ["eval", "vqa", "--data", "d", "-v"], ["-v", "train", "stage1"]])
def test_verbose_goes_before_or_after_the_command(argv):
    assert cli.build_parser().parse_args(argv).verbose == ("-v" in argv or "--verbose" in argv)


def test_our_notes_and_warnings_stay_the_libraries_go(files, capsys, monkeypatch):
    import logging
    import warnings

    library_logs = []

    def noisy(self, images, prompt=None, **generation):
        logging.getLogger("blip2.inference").info("a note of ours")
        library_logs.append(logging.getLogger("some_library").isEnabledFor(logging.WARNING))
        warnings.warn_explicit("a warning of ours", UserWarning, "pipeline.py", 1, module="blip2.inference.pipeline")
        warnings.warn_explicit("a library's warning", UserWarning, "utils.py", 1, module="transformers.utils")
        return ["a caption"] * len(images)

    monkeypatch.setattr(Blip2, "caption", noisy)
    monkeypatch.setattr(sys, "warnoptions", [])
    for verbose in ([], ["-v"]):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            code, out, err = run(capsys, *verbose, "caption", files["img"], "-m", files["opt"])
        assert code == 0 and out.endswith(": a caption\n")
        assert err == "blip2: note: a note of ours\n"
        messages = [str(w.message) for w in shown]
        assert messages == ["a warning of ours"] + (["a library's warning"] if verbose else [])
    assert library_logs == [False, True]
    assert logging.getLogger("blip2").handlers == []  # put back for whoever calls main() next
