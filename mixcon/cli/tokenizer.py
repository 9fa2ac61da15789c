"""`mixcon tokenizer train`: a byte-level BPE with split digits and BOS/EOS/PAD, saved as tokenizer.json."""

from __future__ import annotations

import argparse
import time

from mixcon.cli.common import add_command, add_corpus_action, add_max_bytes_argument, check_out_folder, number_type
from mixcon.data.corpus import Corpus
from mixcon.data.tokenizer import FILENAME, train_bpe_tokenizer

TRAIN_DESCRIPTION = """\
Train a byte-level BPE (no unknown tokens, every digit its own token, specials <|bos|> <|eos|> <|pad|>)
and save it as OUT/tokenizer.json, which `tokenizers` and transformers' PreTrainedTokenizerFast load
(they encode text spelling a special token as its id; mixcon encodes it as text, as their
encode_special_tokens=True / split_special_tokens=True do).
Prints documents, bytes, tokens and bytes per token of the corpus."""


def register(sub: argparse._SubParsersAction) -> None:
    actions = add_command(sub, "tokenizer", "Tokenizers", "train a BPE tokenizer on a corpus")
    t = add_corpus_action(actions, "train", "train a byte-level BPE and save tokenizer.json", TRAIN_DESCRIPTION)
    t.add_argument("--vocab-size", type=number_type(int, 259, maximum=2**24), default=8192,
                   help="vocabulary size with the 3 specials, in [259, 2**24] (default: %(default)s; 256000 in the "
                        "paper)")
    add_max_bytes_argument(t, None, "train on")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer.json already in --out")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    out = check_out_folder("tokenizer train", args.out)  # before the training, not after it
    if (out / FILENAME).exists() and not args.overwrite:
        raise SystemExit(f"mixcon tokenizer train: {out / FILENAME} exists (a model's tokenizer?); replace it with "
                         "--overwrite, or choose another --out")
    try:
        corpus = Corpus.from_spec(args.corpus, exclude=[out / FILENAME])  # not the tokenizer of an earlier run
        start = time.perf_counter()
        tok = train_bpe_tokenizer(corpus.documents(args.max_bytes), args.vocab_size)
        train_s = time.perf_counter() - start
        path = tok.save(args.out)
        documents = n_bytes = tokens = 0
        start = time.perf_counter()
        for doc in corpus.documents(args.max_bytes):
            documents += 1
            n_bytes += len(doc.encode("utf-8"))
            tokens += len(tok.encode(doc))
        encode_s = time.perf_counter() - start
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"mixcon tokenizer train: {e}") from e
    print(f"corpus       {corpus.describe()}")
    print(f"documents    {documents:,} ({len(corpus.skipped)} files or records skipped)")
    print(f"bytes        {n_bytes:,}")
    print(f"tokens       {tokens:,}")
    print(f"bytes/token  {n_bytes / tokens:.3f} (the bytes tokenizer: 1.000)")
    print(f"vocabulary   {tok.vocab_size:,} (asked for {args.vocab_size:,})")
    print(f"time         training {train_s:.1f} s, encoding {encode_s:.1f} s ({n_bytes / 1e6 / encode_s:.2f} MB/s)")
    print(f"saved        {path}")
    return 0
