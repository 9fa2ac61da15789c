"""Evaluation: perplexity and bits per byte on documents, and the `lm-eval` harness adapter."""

from mixcon.evaluation.perplexity import MODES, TextScore, document_nll, evaluate_texts, window_spans

__all__ = ["MODES", "TextScore", "document_nll", "evaluate_texts", "window_spans"]
