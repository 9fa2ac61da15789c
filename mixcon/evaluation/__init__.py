"""Evaluation: perplexity and bits per byte on documents, recall accuracy on MQAR, and the next-real-token
loss among uninformative tokens."""

from mixcon.evaluation.filler import filler_loss
from mixcon.evaluation.perplexity import MODES, TextScore, document_nll, evaluate_texts, window_spans
from mixcon.evaluation.recall import recall_accuracy

__all__ = ["MODES", "TextScore", "document_nll", "evaluate_texts", "filler_loss", "recall_accuracy", "window_spans"]
