"""Data fixtures: small BPEs, synthetic corpora."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from mixcon.data import BPETokenizer, default_corpus, train_bpe_tokenizer

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "def", "return", "self", "2024", "über",
         "naïve", "東京", "😀", "x1", "y2"]


@pytest.fixture(scope="session")
def bpe() -> BPETokenizer:
    """A 1024-token BPE trained on 200 KB of the default corpus (Python standard library source)."""
    return train_bpe_tokenizer(default_corpus().documents(max_bytes=200_000), vocab_size=1024)


def _random_documents(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}\n" + " ".join(rng.choice(WORDS) + ("\n" if rng.random() < 0.1 else "")
                                     for _ in range(rng.randint(1, words))) for i in range(n)]


def _write_documents(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:05d}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def random_documents() -> Callable[..., list[str]]:
    """(n, seed=0) -> n distinct documents of random words and lines (ASCII, accents, CJK, emoji, digits)."""
    return _random_documents


@pytest.fixture(scope="session")
def write_documents() -> Callable[[Path, list[str]], Path]:
    """(folder, docs) -> folder with one .txt file per document, named so that sorted order is document order."""
    return _write_documents
