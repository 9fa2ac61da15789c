"""Tokenizers (byte-level BPE, raw bytes), corpora, token shards and batch loaders."""

from mixcon.data.corpus import Corpus, default_corpus
from mixcon.data.loader import TrainLoader, eval_batches
from mixcon.data.shards import ShardDataset, ShardError, prepare_shards, training_documents
from mixcon.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "ShardDataset",
    "ShardError",
    "TrainLoader",
    "default_corpus",
    "eval_batches",
    "load_tokenizer",
    "prepare_shards",
    "train_bpe_tokenizer",
    "training_documents",
]
