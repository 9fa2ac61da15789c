"""Evaluation: perplexity and bits per byte on documents, and recall accuracy on MQAR."""

from mixcon.evaluation.perplexity import MODES, TextScore, document_nll, evaluate_texts, window_spans
from mixcon.evaluation.recall import recall_accuracy

__all__ = ["MODES", "TextScore", "document_nll", "evaluate_texts", "recall_accuracy", "window_spans"]
