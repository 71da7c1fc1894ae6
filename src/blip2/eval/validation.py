"""Validation during training: part of an evaluation set scored by the same code as `blip2 eval`.

A recipe builds one `Validator` before any compute (so a bad path fails early) and calls it every
`val.every` steps and at the end, on the main process, with the model being trained. It returns a few
numbers for metrics.jsonl / TensorBoard, prefixed `val_`:
- vqa:       val_vqa_accuracy (official VQA accuracy, x100)
- caption:   val_bleu4, val_cider (the pure-Python scorer: no Java, the same on every machine)
- retrieval: val_txt_r1, val_img_r1 (ITC top-k re-ranked by ITM, k = `RERANK_K` to keep it quick)
Generation is greedy with few new tokens: a cheap, stable signal, not the final evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blip2.eval import datasets

TASKS = ("vqa", "caption", "retrieval")
NEEDS_LLM = ("vqa", "caption")
RERANK_K = 16
GENERATION = {"num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 1}


@dataclass
class Validator:
    task: str
    data: Any  # list[VQAItem] | list[CaptionItem] | RetrievalSet
    batch_size: int = 16

    @classmethod
    def load(cls, task: str, data: str, image_root: str | None = None, limit: int | None = None,
             batch_size: int = 16) -> Validator:
        """Read the validation data (`data` as `blip2 eval --data` takes it: a file, a folder or a packaged
        name such as easy-vqa:test); errors are ValueError / FileNotFoundError naming the problem."""
        check_task(task)
        if not data:
            raise ValueError("val.data is empty: name the validation set (a file, or e.g. easy-vqa:test)")
        return cls(task, datasets.load(task, [data], image_root or None, limit), batch_size)

    def __call__(self, model, tokenizer=None, qformer_tokenizer=None) -> dict[str, float]:
        """Score `model` (a Blip2Model, left in the train/eval mode it came in)."""
        import torch

        from blip2.inference.pipeline import Blip2

        was_training = model.training
        try:
            with torch.no_grad():
                blip = Blip2(model, tokenizer, qformer_tokenizer, batch_size=self.batch_size, progress=False)
                return getattr(self, f"_{self.task}")(blip)
        finally:
            model.train(was_training)

    def _vqa(self, blip) -> dict[str, float]:
        from blip2.eval.vqa import predict_answers, score

        answers, _, _ = predict_answers(blip, self.data, GENERATION, progress=False)
        return {"val_vqa_accuracy": score(self.data, answers).overall}

    def _caption(self, blip) -> dict[str, float]:
        from blip2.eval.caption import predict_captions
        from blip2.eval.metrics import caption_metrics

        captions = predict_captions(blip, self.data, generation=GENERATION, progress=False)
        result = caption_metrics({it.image_id: c for it, c in zip(self.data, captions)},
                                 {it.image_id: it.references for it in self.data}, backend="fallback",
                                 metrics=("Bleu_4", "CIDEr"))
        return {"val_bleu4": result.scores["Bleu_4"], "val_cider": result.scores["CIDEr"]}

    def _retrieval(self, blip) -> dict[str, float]:
        from blip2.eval.retrieval import ranks, recalls, score_matrices

        scores = score_matrices(blip, self.data, k_test=RERANK_K, progress=False)
        found = recalls(*ranks(scores.i2t, scores.t2i, self.data))
        return {"val_txt_r1": found["txt_r1"], "val_img_r1": found["img_r1"]}


def check_task(task: str, has_llm: bool = True, has_heads: bool = True) -> None:
    """Fail before training when `task` is unknown or the model being trained cannot be validated with it."""
    if task not in TASKS:
        raise ValueError(f"val.task must be one of {', '.join(TASKS)}, got {task!r}")
    if task in NEEDS_LLM and not has_llm:
        raise ValueError(f"val.task={task} needs a model with an LLM (stage 2); a stage-1 model validates with "
                         "val.task=retrieval")
    if task == "retrieval" and not has_heads:
        raise ValueError("val.task=retrieval needs the ITC/ITM heads (stage1_heads), which this model lacks")


def build_validator(val: Any, model: Any) -> Validator | None:
    """The Validator a recipe's `val` config (training.options.ValConfig) asks for, checked against the model
    being trained; None when validation is off."""
    if not val.task:
        return None
    check_task(val.task, has_llm=model.config.language is not None, has_heads=model.config.stage1_heads)
    return Validator.load(val.task, val.data, val.image_root, val.limit, val.batch_size)
