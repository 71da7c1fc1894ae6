"""Evaluation metrics as pure functions (REFERENCE §7): VQA accuracy, caption scores, retrieval recall."""

from blip2.eval.metrics.caption import CaptionResult, caption_metrics
from blip2.eval.metrics.retrieval import RetrievalResult, recall_at_k, retrieval_metrics
from blip2.eval.metrics.vqa import (
    VQAResult,
    exact_match,
    gqa_accuracy,
    normalize_answer,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "CaptionResult",
    "RetrievalResult",
    "VQAResult",
    "caption_metrics",
    "exact_match",
    "gqa_accuracy",
    "normalize_answer",
    "recall_at_k",
    "retrieval_metrics",
    "vqa_accuracy",
    "vqa_score",
]
