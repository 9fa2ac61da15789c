"""`mixcon eval perplexity`: loss, perplexity and bits per byte of a checkpoint on a corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixcon.cli.common import add_corpus_command, add_dtype_argument
from mixcon.data.corpus import Corpus
from mixcon.evaluation import MODES, evaluate_texts
from mixcon.ops.dtypes import DTYPES
from mixcon.training.checkpoint import CheckpointError, load_model_and_tokenizer

DESCRIPTION = """\
Score every document of a corpus (an EOS token, then the document) with a model: loss (nats per token),
perplexity and bits per byte (comparable across tokenizers). --mode window: sliding windows of --context
tokens, --stride apart (default: disjoint windows); --mode stream: each document whole, --context tokens
at a time through the decoding cache, so every token is predicted from everything before it. The default
corpus is the one `mixcon train` trains on by default; for held-out numbers name text the model has not
seen, e.g. ../shared/data/wikitext2_test.txt."""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_corpus_command(sub, "eval", "Evaluation", "evaluate a checkpoint", "perplexity",
                           "loss, perplexity and bits per byte on a corpus", DESCRIPTION)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory, checkpoint or model directory")
    p.add_argument("--max-bytes", type=int, default=None, help="score only the first N bytes of the corpus")
    p.add_argument("--mode", choices=MODES, default="window", help="see above (default: %(default)s)")
    p.add_argument("--context", type=int, default=1024, help="window or chunk length in tokens (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default: --context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows or documents side by side (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer path (default: the checkpoint's own)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_dtype_argument(p)
    p.add_argument("--compile", action="store_true", help="run the Conba scans through the compiled prefill")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    try:
        model, tok = load_model_and_tokenizer(args.checkpoint, args.device, args.tokenizer)
        model.to(DTYPES[args.dtype])
        if args.compile:
            model.compile_prefill()
        corpus = Corpus.from_spec(args.corpus)
        score = evaluate_texts(model, tok, corpus.documents(args.max_bytes), context=args.context,
                               stride=args.stride, mode=args.mode, batch_size=args.batch_size,
                               progress=not args.no_progress)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"mixcon eval perplexity: {e}") from e
    result = {"checkpoint": str(args.checkpoint), "corpus": corpus.describe(), "mode": args.mode,
              "context": args.context, "stride": args.stride or args.context, "dtype": args.dtype,
              **score.as_dict()}
    print(f"corpus: {result['corpus']}\n"
          f"{score.documents:,} documents, {score.tokens:,} tokens, {score.bytes:,} bytes, mode {args.mode}, "
          f"context {args.context}" + (f", stride {result['stride']}" if args.mode == "window" else "") + "\n"
          f"loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.3f}, "
          f"{score.bits_per_byte:.4f} bits/byte ({result['tokens_per_s']:,.0f} tokens/s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
