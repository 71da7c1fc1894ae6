"""`blip2 eval vqa|caption|retrieval|chat` end to end on tiny random checkpoints and tiny data in tmp_path.

The tiny models' answers are wrong (random weights, a word-level vocabulary of 60 words): these tests pin the
pipeline and the outputs' structure and consistency (metrics recomputed from the predictions file equal
the metrics file), the ITM re-ranking against `Blip2.retrieve`, the easy-VQA labels, and the error lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
from PIL import Image

from blip2 import cli
from blip2.eval import datasets, easy_vqa
from blip2.eval.metrics import normalize_answer, retrieval_metrics, vqa_accuracy
from blip2.eval.metrics.vqa import vqa_score
from blip2.eval.report import METRICS, PREDICTIONS, REPORT, SAMPLES, read_jsonl

FAST = ["--num-beams", "1", "--max-new-tokens", "3"]
OUTPUTS = (PREDICTIONS, METRICS, REPORT, SAMPLES)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tm.save_generation_model(root / "opt", "opt")
    tm.save_retrieval_model(root / "itm")
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "val2014").mkdir()
    for i, image in enumerate(tm.images(4)):
        image.save(root / "data" / "images" / f"{i}.png")
        image.convert("RGB").save(root / "data" / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg")
    questions = ["what color is the circle?", "is there a square?", "what shape is this?"]
    answers = [["red"] * 6 + ["blue"] * 4, ["yes"], ["circle", "square"]]  # 10, 1 and 2 answers
    vqa_rows = [
        {"image": f"images/{i % 4}.png", "question": questions[i % 3], "answers": answers[i % 3],
         "answer_type": "yes/no" if i % 3 == 1 else "other"}
        for i in range(7)
    ]
    _jsonl(root / "data" / "vqa.jsonl", vqa_rows)
    caps = [["a red circle", "a small red circle on a photo"], ["a blue square"],
            ["a green triangle", "a triangle"], ["two dogs on the grass", "a dog"]]
    rows = [{"image": f"images/{i}.png", "text": c} for i, c in enumerate(caps)]
    _jsonl(root / "data" / "captions.jsonl", rows)
    coco = {"images": [{"id": 10 + i, "file_name": f"images/{i}.png"} for i in range(4)],
            "annotations": [{"image_id": 10 + i, "caption": c, "id": k} for i, cs in enumerate(caps)
                            for k, c in enumerate(cs)]}  # fmt: skip
    (root / "data" / "captions_coco.json").write_text(json.dumps(coco))
    v2 = root / "data" / "vqav2"
    v2.mkdir()
    qs = [{"question_id": 100 + i, "image_id": i % 4 + 1, "question": questions[i % 3]} for i in range(5)]
    anns = [{"question_id": 100 + i, "image_id": i % 4 + 1, "question_type": "what color is the",
             "answer_type": "other", "answers": [{"answer": "red", "answer_id": j} for j in range(10)]}
            for i in range(5)]  # fmt: skip
    (v2 / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": qs}))
    (v2 / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    _jsonl(root / "data" / "bad_chat.jsonl", [{"image": "images/0.png", "turns": ["what shape is this?"]}])
    return {"root": root, "opt": root / "opt", "itm": root / "itm", "data": root / "data", "vqav2": v2}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _outputs(out: Path) -> tuple[list[dict], dict, str]:
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    with Image.open(out / SAMPLES) as im:
        assert im.format == "PNG" and im.width > 100
    report = (out / REPORT).read_text()
    assert f"]({SAMPLES})" in report
    return read_jsonl(out / PREDICTIONS), json.loads((out / METRICS).read_text()), report


def _check_vqa(rows: list[dict], metrics: dict) -> None:
    keys = ("question_id", "answers", "question_type", "answer_type")
    predictions = {r["question_id"]: r["prediction"] for r in rows}
    again = vqa_accuracy(predictions, [{k: r[k] for k in keys} for r in rows])
    assert metrics["accuracy"] == again.overall
    assert metrics["per_answer_type"] == again.per_answer_type
    assert metrics["per_question_type"] == again.per_question_type
    assert metrics["n_questions"] == len(rows)
    assert all(isinstance(r["prediction"], str) for r in rows)


# ----------------------------------------------------------------------------------------------- VQA


def test_eval_vqa_jsonl_writes_everything(files, capsys):
    out = files["root"] / "out-vqa"
    code, stdout, _ = run(capsys, "eval", "vqa", "-m", files["opt"], "--data", files["data"] / "vqa.jsonl",
                          "--out", out, "--batch-size", "3", *FAST)
    assert code == 0, stdout
    rows, metrics, report = _outputs(out)
    assert [r["question_id"] for r in rows] == list(range(7))
    assert rows[0]["answers"] == ["red"] * 6 + ["blue"] * 4
    assert Path(rows[0]["image"]).is_absolute()
    _check_vqa(rows, metrics)
    assert set(metrics["per_answer_type"]) == {"yes/no", "other"}
    assert metrics["generation"]["num_beams"] == 1 and metrics["template"] == "Question: {} Answer:"
    assert "# VQA evaluation" in report and "| overall |" in report
    assert f"VQA accuracy {metrics['accuracy']:.2f}" in stdout and str(out) in stdout


def test_eval_vqa_batches_share_image_encodings(files, monkeypatch):
    """Each batch encodes each of its images once and gives every question its own image's soft prompt."""
    import blip2
    from blip2.eval.vqa import predict_answers

    items = datasets.load_vqa([str(files["data"] / "vqa.jsonl")])
    model = blip2.load(files["opt"], batch_size=7)
    per_question = model._soft_prompts([it.image for it in items])  # (7, Q, H): every image encoded again
    encoded, generated = [], []
    encode_images, generate = model.encode_images, model._generate
    monkeypatch.setattr(model, "encode_images",
                        lambda images: encoded.append(len(images)) or encode_images(images))
    monkeypatch.setattr(model, "_generate", lambda soft, prompts, gen: generated.append((soft, prompts))
                        or generate(soft, prompts, gen))
    answers, template, gen = predict_answers(model, items, {"num_beams": 1, "max_new_tokens": 3})
    assert encoded == [4]  # 7 questions about 4 images
    (soft, prompts), = generated
    assert torch.allclose(soft, per_question, atol=1e-5)
    assert prompts[0] == "Question: what color is the circle? Answer:"  # LAVIS question cleaning + template
    assert len(answers) == 7 and gen == {"num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 1}


def test_eval_vqav2_folder_or_two_files(files, capsys):
    out1, out2 = files["root"] / "v2-folder", files["root"] / "v2-files"
    assert run(capsys, "eval", "vqa", "-m", files["opt"], "--data", files["vqav2"],
               "--image-root", files["data"], "--out", out1, *FAST)[0] == 0
    annotations, questions = sorted(files["vqav2"].iterdir())  # either order works
    assert run(capsys, "eval", "vqa", "-m", files["opt"], "--data", annotations, questions,
               "--image-root", files["data"], "--out", out2, "--limit", "3", *FAST)[0] == 0
    rows, metrics, _ = _outputs(out1)
    assert [r["question_id"] for r in rows] == [100, 101, 102, 103, 104]
    assert metrics["per_question_type"].keys() == {"what color is the"}
    _check_vqa(rows, metrics)
    rows2, _, _ = _outputs(out2)
    assert [r["question_id"] for r in rows2] == [100, 101, 102]


def test_eval_easy_vqa_limit_5(files, capsys):
    out = files["root"] / "out-easy-vqa"
    code, stdout, _ = run(capsys, "eval", "vqa", "-m", files["opt"], "--data", "easy-vqa:test",
                          "--limit", "5", "--out", out, "--json", *FAST)
    assert code == 0
    rows, metrics, report = _outputs(out)
    assert len(rows) == 5 and metrics["data"] == "easy-vqa:test"
    assert all(len(r["answers"]) == 1 for r in rows)
    assert {r["question_type"] for r in rows} <= {"yes/no", "colour", "shape"}
    for r in rows:
        assert r["answer_type"] == ("yes/no" if r["question_type"] == "yes/no" else "other")
        assert r["accuracy"] == (100.0 if normalize_answer(r["prediction"]) == r["answers"][0] else 0.0)
    _check_vqa(rows, metrics)
    assert "question type: colour" in report
    assert json.loads(stdout) == metrics  # --json prints the metrics file


# ------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("data", ["captions.jsonl", "captions_coco.json"])
def test_eval_caption_writes_everything(files, capsys, data):
    out = files["root"] / f"out-caption-{data}"
    code, stdout, _ = run(capsys, "eval", "caption", "-m", files["opt"], "--data", files["data"] / data,
                          "--out", out, "--metrics-backend", "fallback", *FAST)
    assert code == 0
    rows, metrics, report = _outputs(out)
    assert len(rows) == 4 and metrics["n_images"] == 4
    assert rows[0]["references"] == ["a red circle", "a small red circle on a photo"]
    assert set(metrics["scores"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert set(metrics["unavailable"]) == {"METEOR", "SPICE"}
    assert metrics["backend"].startswith("fallback")
    assert "colour_shape_accuracy" not in metrics
    assert "# Caption evaluation" in report and "CIDEr" in stdout


def test_eval_easy_vqa_captions(files, capsys):
    out = files["root"] / "out-easy-captions"
    assert run(capsys, "eval", "caption", "-m", files["opt"], "--data", "easy-vqa-captions:test",
               "--limit", "6", "--out", out, "--metrics-backend", "fallback", *FAST)[0] == 0
    rows, metrics, report = _outputs(out)
    labels = easy_vqa.image_labels("test")
    assert [r["image_id"] for r in rows] == list(range(6))
    for r in rows:
        assert (r["colour"], r["shape"]) == labels[r["image_id"]]
        assert r["references"] == [f"a {r['colour']} {r['shape']}"]
        assert r["colour_shape_ok"] == (r["colour_ok"] and r["shape_ok"])
    assert metrics["colour_shape_accuracy"] == round(100 * np.mean([r["colour_shape_ok"] for r in rows]), 2)
    assert metrics["colour_accuracy"] == round(100 * np.mean([r["colour_ok"] for r in rows]), 2)
    assert "colour-and-shape accuracy" in report


def test_colour_shape_scores():
    score = easy_vqa.colour_shape_scores
    assert score("a red circle", "red", "circle") == {"colour": True, "shape": True, "colour_shape": True}
    assert score("A Red circle.", "red", "circle")["colour_shape"]
    assert score("a red and blue circle", "red", "circle") == {
        "colour": False, "shape": True, "colour_shape": False}
    assert score("a red shape", "red", "circle") == {"colour": True, "shape": False, "colour_shape": False}
    assert score("a grey triangle", "gray", "triangle")["colour_shape"]
    assert not score("red circles", "red", "circle")["shape"]  # plurals are not the shape word
    assert not score("a red square", "red", "rectangle")["shape"]


def test_easy_vqa_labels_agree_with_every_question():
    """Labels for all 1,000 test images, all 24 colour-shape pairs, and no question contradicts them."""
    labels = easy_vqa.image_labels("test")
    assert len(labels) == 1000 and len(set(labels.values())) == 24
    for q in easy_vqa.questions("test"):
        colour, shape = labels[q.image_id]
        if q.answer in easy_vqa.COLOURS:
            assert q.answer == colour
        elif q.answer in easy_vqa.SHAPES:
            assert q.answer == shape
        else:  # a yes/no question about one colour or shape word
            words = q.question.replace("?", "").split()
            named = [w for w in words if w in easy_vqa.COLOURS + easy_vqa.SHAPES]
            holds = any(w in (colour, shape) for w in named)
            negated = "not" in words or "no" in words
            assert (q.answer == "yes") == (holds != negated), q


# ------------------------------------------------------------------------------------------ retrieval


def test_eval_retrieval_writes_everything(files, capsys):
    out = files["root"] / "out-retrieval"
    code, stdout, _ = run(capsys, "eval", "retrieval", "-m", files["itm"], "--data",
                          files["data"] / "captions.jsonl", "--out", out, "--k-test", "3")
    assert code == 0
    rows, metrics, report = _outputs(out)
    t_rows = [r for r in rows if r["direction"] == "text->image"]
    i_rows = [r for r in rows if r["direction"] == "image->text"]
    assert len(t_rows) == metrics["n_texts"] == 7 and len(i_rows) == metrics["n_images"] == 4
    # recall recomputed from the ranks in the predictions file
    for key, field in (("itm_rerank", "rank"), ("itc", "itc_rank")):
        tr = np.array([r[field] for r in i_rows])
        ir = np.array([r[field] for r in t_rows])
        assert metrics[key]["txt_r1"] == pytest.approx(100 * np.mean(tr < 1))
        assert metrics[key]["img_r5"] == pytest.approx(100 * np.mean(ir < 5))
    assert all(len(r["top"]) == 4 for r in t_rows)  # all 4 images, best first
    for r in rows:
        scores = [h["score"] for h in r["top"]]
        assert scores == sorted(scores, reverse=True)
    assert "ITC + ITM re-rank (top 3)" in report and "re-ranked" in stdout


def test_rerank_matches_blip2_retrieve_and_lavis_recall(files):
    """One encoding pass gives what Blip2.retrieve gives per text; recall equals retrieval_metrics."""
    import blip2
    from blip2.eval.retrieval import ranks, recalls, score_matrices

    data = datasets.load_retrieval([str(files["data"] / "captions.jsonl")])
    model = blip2.load(files["itm"], batch_size=2)
    s = score_matrices(model, data, k_test=3)
    assert torch.allclose(s.itc, model.similarity(data.images, data.texts), atol=1e-5)
    hits = model.retrieve(data.texts, data.images, k=3, rerank=3)
    for t, matches in enumerate(hits):
        order = s.t2i[t].argsort(descending=True)[:3].tolist()
        assert order == [m.index for m in matches]
        assert s.t2i[t, order].tolist() == pytest.approx([m.score for m in matches], abs=1e-5)
        assert (s.t2i[t] == -100).sum() == len(data.images) - 3  # outside the top k
    for i in range(len(data.images)):  # image -> text: ITM logit + ITC on the top 3 texts
        top = s.itc[i].topk(3).indices
        logits = model.model.itm_logits(
            *_itm_inputs(model, data.images[i], [data.texts[t] for t in top]))[:, 1]
        assert s.i2t[i, top].tolist() == pytest.approx((logits + s.itc[i, top]).tolist(), abs=1e-5)
    txt2img = [imgs[0] for imgs in data.txt2img]
    for scores_i2t, scores_t2i in ((s.itc, s.itc.T), (s.i2t, s.t2i)):
        ours = recalls(*ranks(scores_i2t.numpy(), scores_t2i.numpy(), data))
        lavis = retrieval_metrics(scores_i2t, data.img2txt, txt2img, scores_t2i=scores_t2i).as_dict()
        assert ours == pytest.approx(lavis)


@torch.no_grad()
def _itm_inputs(model, image, texts):
    from blip2.data.text import tokenize_qformer

    feats = model.encode_images([image]).expand(len(texts), -1, -1)
    tokens = tokenize_qformer(model.qformer_tokenizer, texts)
    return feats, tokens.input_ids, tokens.attention_mask


def test_eval_easy_vqa_retrieval(files, capsys):
    out = files["root"] / "out-easy-retrieval"
    assert run(capsys, "eval", "retrieval", "-m", files["itm"], "--data", "easy-vqa-retrieval:test",
               "--limit", "12", "--out", out)[0] == 0
    rows, metrics, report = _outputs(out)
    labels = easy_vqa.image_labels("test")
    assert metrics["n_images"] == 12 and metrics["n_texts"] == 24 and metrics["multi_image_texts"]
    per_text = metrics["precision_at_10_per_text"]
    assert list(per_text) == easy_vqa.all_caption_texts()
    t_rows = {r["text"]: r for r in rows if r["direction"] == "text->image"}
    for text, p in per_text.items():
        n = sum(easy_vqa.caption_text(*labels[i]) == text for i in range(12))
        assert p["n_images"] == n
        if n == 0:
            assert p["itc"] is None and p["itm_rerank"] is None and t_rows[text]["rank"] == -1
        else:  # share of the 10 best images that show this colour and shape
            assert p["itm_rerank"] == pytest.approx(10 * sum(h["match"] for h in t_rows[text]["top"]))
    queries = [p["itm_rerank"] for p in per_text.values() if p["itm_rerank"] is not None]
    assert metrics["itm_rerank"]["precision_at_10"] == pytest.approx(np.mean(queries))
    assert metrics["n_text_queries"] == len(queries)
    assert "Precision@10 per text" in report and "| a red triangle |" in report


# --------------------------------------------------------------------------------------------- errors


# ---------------------------------------------------------------------------------------------- chat


def test_eval_chat_writes_everything(files, capsys):
    """Each conversation is one session: turn 2's prompt holds turn 1 with the model's own answer."""
    _jsonl(files["data"] / "chat.jsonl", [
        {"image": "images/0.png", "turns": [["what shape is this?", "circle"], ["what color is it?", ["red", "blue"]]]},
        {"image": "images/1.png", "turns": [["is there a square?", "yes"]]},
    ])
    out = files["root"] / "out-chat"
    code, stdout, _ = run(capsys, "eval", "chat", "-m", files["opt"], "--data", files["data"] / "chat.jsonl",
                          "--out", out, *FAST)
    assert code == 0, stdout
    rows, metrics, report = _outputs(out)
    assert [len(r["turns"]) for r in rows] == [2, 1] and rows[0]["turns"][1]["answers"] == ["red", "blue"]
    scores = [100.0 * vqa_score(t["prediction"], t["answers"]) for r in rows for t in r["turns"]]
    assert [t["accuracy"] for r in rows for t in r["turns"]] == scores
    assert metrics["turn_accuracy"] == round(sum(scores) / 3, 2) and metrics["n_turns"] == 3
    assert metrics["per_turn_accuracy"] == {"1": round((scores[0] + scores[2]) / 2, 2), "2": round(scores[1], 2)}
    right = [all(t["accuracy"] >= 100 for t in r["turns"]) for r in rows]
    assert [r["all_right"] for r in rows] == right and metrics["conversation_accuracy"] == 50.0 * sum(right)
    assert "# Chat evaluation" in report and "chat: 2 conversations" in stdout


def test_chat_prompts_carry_the_earlier_turns(files, monkeypatch):
    from blip2.eval.chat import evaluate_chat
    from blip2.inference.pipeline import load

    from blip2.inference.pipeline import ChatSession

    model = load(files["opt"])
    prompts = []
    fit = ChatSession._fit  # each turn's whole prompt (a kept key/value cache then prefills only its new part)
    monkeypatch.setattr(ChatSession, "_fit", lambda self, q: prompts.append(fit(self, q)) or prompts[-1])
    item = datasets.ChatItem(0, str(files["data"] / "images" / "0.png"), [("what shape is this?", ["circle"]),
                                                                        ("what color is it?", ["red"])])
    out = files["root"] / "out-chat-2"
    out.mkdir()
    evaluate_chat(model, [item], out, generation={"num_beams": 1, "max_new_tokens": 2})
    first = read_jsonl(out / PREDICTIONS)[0]["turns"][0]["prediction"]
    assert prompts == ["Question: what shape is this? Answer:",
                       f"Question: what shape is this? Answer: {first}. Question: what color is it? Answer:"]


def test_easy_vqa_chat_asks_shape_then_colour():
    items = datasets.load_chat(["easy-vqa-chat:test"], limit=3)
    labels = easy_vqa.image_labels("test")
    assert len(items) == 3 and len(datasets.load_chat(["easy-vqa-chat:test"])) == 1000
    for item in items:
        colour, shape = labels[item.conversation_id]
        assert item.turns == [("what shape is this?", [shape]), ("what color is it?", [colour])]
        assert Path(item.image).name == f"{item.conversation_id}.png"


def _one_error_line(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if "blip2: error:" in line]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["vqa", "--data", "{data}/missing.jsonl"], "does not exist"),
        (["vqa", "--data", "coco:test"], "unknown dataset name 'coco:test'"),
        (["vqa", "--data", "easy-vqa:val"], "no split 'val'"),
        (["vqa", "--data", "easy-vqa-captions:test"], "blip2 eval caption"),
        (["caption", "--data", "easy-vqa:test"], "blip2 eval vqa"),
        (["vqa", "--data", "{data}/vqa.jsonl", "--image-root", "{root}"], "pass --image-root"),
        (["vqa", "--data", "{data}/captions.jsonl"], "needs keys 'image', 'question' and 'answers'"),
        (["vqa", "--data", "{data}"], "exactly one *questions*.json"),
        (["vqa", "--data", "{vqav2}/v2_mscoco_val2014_annotations.json"], "questions JSON and its annot"),
        (["vqa", "--data", "{data}/vqa.jsonl", "--template", "no slot"], "--template"),
        (["caption", "--data", "{data}/vqa.jsonl"], "needs keys 'image' and 'text'"),
        (["retrieval", "--data", "{data}/nothing.json"], "does not exist"),
        (["vqa", "--data", "{data}/vqa.jsonl", "--out", "{data}/vqa.jsonl"], "is a file"),
        (["chat", "--data", "easy-vqa:test"], "blip2 eval vqa"),
        (["chat", "--data", "{data}/vqa.jsonl"], "needs keys 'image' and 'turns'"),
        (["chat", "--data", "{data}/bad_chat.jsonl"], "list of [question, answer] pairs"),
    ],
)
def test_bad_inputs_give_one_clear_line(files, capsys, argv, needle):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, out, err = run(capsys, "eval", *argv[:1], "-m", files["root"] / "no-model-needed", *argv[1:])
    assert code == cli.EXIT_ERROR and out == ""
    _one_error_line(code, err, needle)


def test_wrong_kind_of_model_and_usage_errors(files, capsys):
    code, _, err = run(capsys, "eval", "retrieval", "-m", files["opt"],
                       "--data", files["data"] / "captions.jsonl", "--out", files["root"] / "never")
    _one_error_line(code, err, "no image-text matching heads")
    for argv in (["eval"], ["eval", "vqa"], ["eval", "vqa", "--data", "x", "--limit", "0"], ["eval", "ocr"]):
        code, _, err = run(capsys, *argv)
        assert code == cli.EXIT_USAGE and "Traceback" not in err


def test_eval_help(capsys):
    for task in ("vqa", "caption", "retrieval", "chat"):
        assert cli.main(["eval", task, "--help"]) == 0
        assert f"usage: blip2 eval {task}" in capsys.readouterr().out
        parser = cli.build_parser()._subparsers._group_actions[0].choices["eval"]
        sub = parser._subparsers._group_actions[0].choices[task]
        assert all(action.help for action in sub._actions), task


def test_default_out_dir_is_timestamped(tmp_path, monkeypatch):
    from blip2.eval.report import default_out_dir, prepare_out_dir

    monkeypatch.chdir(tmp_path)
    first = prepare_out_dir(None, "vqa")
    assert first.parent == Path("outputs") and first.name.startswith("eval-vqa-") and first.is_dir()
    assert default_out_dir("vqa") != first  # same second: a suffix keeps runs apart
