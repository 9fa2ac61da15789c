"""`mixcon data prepare`: tokenise a corpus into memory-mapped token shards (reused when unchanged)."""

from __future__ import annotations

import argparse

from mixcon.cli.common import (
    FRACTION,
    SEED,
    add_command,
    add_corpus_action,
    add_max_bytes_argument,
    check_out_folder,
    number_type,
)
from mixcon.data.corpus import Corpus
from mixcon.data.shards import prepare_shards
from mixcon.data.tokenizer import load_tokenizer

PREPARE_DESCRIPTION = """\
Tokenise a corpus into memory-mapped uint16/uint32 shards with a JSON index (OUT/index.json), split into
train and validation by document, EOS after each document. Shards already built from the same tokenizer,
corpus and split settings are reused; a second build of the same OUT waits for the first.
Prints documents, bytes, tokens and bytes per token per split."""


def register(sub: argparse._SubParsersAction) -> None:
    actions = add_command(sub, "data", "Data", "tokenise a corpus into token shards")
    d = add_corpus_action(actions, "prepare", "tokenise a corpus into train/val token shards", PREPARE_DESCRIPTION)
    d.add_argument("--tokenizer", default="bytes",
                   help="'bytes', a tokenizer.json, or a folder containing one (default: %(default)s)")
    d.add_argument("--out", required=True, help="folder for the shards and index.json")
    d.add_argument("--val-fraction", type=FRACTION, default=0.01,
                   help="share of the bytes for validation, in whole documents, in [0, 1); a single text: its "
                        "last part (default: %(default)s)")
    d.add_argument("--seed", type=SEED, default=0,
                   help="seed of the train/validation split (default: %(default)s)")
    d.add_argument("--workers", type=number_type(int, 1), default=None,
                   help="tokenising processes (default: one per CPU)")
    add_max_bytes_argument(d, None, "tokenise")
    d.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    check_out_folder("data prepare", args.out)  # before the corpus is read
    try:
        tok = load_tokenizer(args.tokenizer)
        corpus = Corpus.from_spec(args.corpus, exclude=[args.out])
        ds = prepare_shards(corpus, tok, args.out, val_fraction=args.val_fraction, seed=args.seed,
                            workers=args.workers, max_bytes=args.max_bytes)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"mixcon data prepare: {e}") from e
    print(ds.summary())
    return 0
