"""`mixcon eval perplexity|tasks`: a checkpoint's perplexity on a corpus, or its scores on `lm-eval` tasks."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from mixcon.cli.common import (
    add_available_device_argument,
    add_command,
    add_corpus_action,
    add_dtype_argument,
    add_max_bytes_argument,
    check_cuda_graphs,
    existing_folder,
    number_type,
    output_file,
)
from mixcon.data.corpus import Corpus
from mixcon.evaluation import MODES, evaluate_texts
from mixcon.io import write_text_atomic
from mixcon.ops.dtypes import DTYPES
from mixcon.training.checkpoint import CheckpointError, load_model_and_tokenizer

DESCRIPTION = """\
Score every document of a corpus (an EOS token, then the document) with a model: loss (nats per token),
perplexity and bits per byte (comparable across tokenizers). --mode window: sliding windows of --context
tokens, --stride apart (default: disjoint windows); --mode stream: each document whole, --context tokens
at a time through the decoding cache, so every token is predicted from everything before it. The default
corpus is the one `mixcon train` trains on by default; for held-out numbers name text the model has not
seen, e.g. ../shared/data/wikitext2_test.txt."""


TASKS_DESCRIPTION = """\
Run tasks of EleutherAI's lm-eval harness (needs `pip install 'mixcon[eval]'`) on a model through
mixcon.integrations.lm_eval.MixConLM: contexts start with EOS, as training documents do; log-likelihoods
are exact (no truncation unless --max-length). The harness's own tasks download their datasets from the
Hugging Face hub; --include-path adds task YAML files of your own (e.g. over local JSON Lines)."""


def register(sub: argparse._SubParsersAction) -> None:
    actions = add_command(sub, "eval", "Evaluation", "evaluate a checkpoint (perplexity, lm-eval tasks)")
    p = add_corpus_action(actions, "perplexity", "loss, perplexity and bits per byte on a corpus", DESCRIPTION)
    _add_model_arguments(p)
    add_max_bytes_argument(p, None, "score")
    p.add_argument("--mode", choices=MODES, default="window", help="see above (default: %(default)s)")
    p.add_argument("--context", type=number_type(int, 1), default=1024,
                   help="window or chunk length in tokens (default: %(default)s)")
    p.add_argument("--stride", type=number_type(int, 1), default=None,
                   help="tokens between windows (default: --context)")
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="also write the results to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_perplexity)
    t = actions.add_parser("tasks", help="scores on lm-eval harness tasks", description=TASKS_DESCRIPTION)
    _add_model_arguments(t)
    t.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,arc_easy")
    t.add_argument("--include-path", type=existing_folder, default=None, metavar="DIR",
                   help="folder of extra task YAML files")
    t.add_argument("--num-fewshot", type=number_type(int, 0), default=None,
                   help="few-shot examples (default: each task's own)")
    t.add_argument("--limit", type=number_type(float, 0, above=True, hint=" (a fraction of each task's documents "
                                                                        "when < 1, else a number of them)"),
                   default=None, help="documents per task (a fraction when < 1; default: all)")
    t.add_argument("--max-length", type=number_type(int, 1), default=None,
                   help="keep only the last N tokens of each input, the new tokens included when generating "
                        "(default: no truncation)")
    t.add_argument("--context", type=number_type(int, 1), default=1024,
                   help="chunk length when streaming whole documents (default: %(default)s)")
    t.add_argument("--seed", type=number_type(int, 0, maximum=2**32 - 1), default=0,  # (numpy's range)
                   help="seed of few-shot sampling and generation (default: 0)")
    t.add_argument("--cuda-graphs", action="store_true",
                   help="replay generation tasks' decoding steps from CUDA graphs (capture_decode; a CUDA --device "
                        "only)")
    t.add_argument("--json", type=output_file, default=None, metavar="FILE", help="also write the results to FILE")
    t.set_defaults(func=run_tasks)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory, checkpoint or model directory")
    p.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer path (default: the checkpoint's own)")
    p.add_argument("--batch-size", type=number_type(int, 1), default=8,
                   help="sequences side by side (default: %(default)s)")
    add_available_device_argument(p)
    add_dtype_argument(p)
    p.add_argument("--compile", action="store_true", help="run the Conba layers through the compiled prefill")


def run_perplexity(args: argparse.Namespace) -> int:
    try:
        corpus = Corpus.from_spec(args.corpus, exclude=[args.json])  # not earlier results
        try:  # read before the model is loaded: an empty one is refused
            texts = list(corpus.documents(args.max_bytes))
        except ValueError as e:
            raise ValueError(f"--corpus: {e}") from e
        model, tok = load_model_and_tokenizer(args.checkpoint, args.device, args.tokenizer, DTYPES[args.dtype])
        if args.compile:
            model.compile_prefill()
        score = evaluate_texts(model, tok, texts, context=args.context, stride=args.stride, mode=args.mode,
                               batch_size=args.batch_size, progress=not args.no_progress)
    except (CheckpointError, OSError, ValueError) as e:  # evaluate_texts' arguments named by their flags
        message = re.sub(r"\b(context|stride|mode)=", r"--\1 ", str(e))
        raise SystemExit(f"mixcon eval perplexity: {message}") from e
    result = {"checkpoint": str(args.checkpoint), "corpus": corpus.describe(), "mode": args.mode,
              "context": args.context, "stride": (args.stride or args.context) if args.mode == "window" else None,
              "dtype": args.dtype,
              **score.as_dict()}
    print(f"corpus: {result['corpus']}\n"
          f"{score.documents:,} documents, {score.tokens:,} tokens, {score.bytes:,} bytes, mode {args.mode}, "
          f"context {args.context}" + (f", stride {result['stride']}" if args.mode == "window" else "") + "\n"
          f"loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.3f}, "
          f"{score.bits_per_byte:.4f} bits/byte ({result['tokens_per_s']:,.0f} tokens/s)")
    _write_json(args.json, result, "perplexity")
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from mixcon.integrations.lm_eval import MixConLM
    except ImportError as e:
        raise SystemExit(f"mixcon eval tasks: needs the lm-eval harness: pip install 'mixcon[eval]' ({e})") from e
    check_cuda_graphs("mixcon eval tasks", args)
    try:
        lm = MixConLM(args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                      batch_size=args.batch_size, max_length=args.max_length, context=args.context,
                      compile=args.compile, seed=args.seed, cuda_graphs=args.cuda_graphs)
        tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
        manager = TaskManager(include_path=args.include_path)
        if unknown := [name for name in tasks if not manager.match_tasks([name])]:
            raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}")
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                              limit=args.limit, log_samples=False, random_seed=args.seed,
                              numpy_random_seed=args.seed, torch_random_seed=args.seed,
                              fewshot_random_seed=args.seed)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"mixcon eval tasks: {e}") from e
    print(make_table(out))
    _write_json(args.json, {"checkpoint": str(args.checkpoint), "results": out["results"],
                            "config": out.get("config", {})}, "tasks")
    return 0


def _write_json(path: Path | None, data: dict[str, Any], action: str) -> None:
    """--json FILE: the results, when asked for."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
    except OSError as e:  # the scores are printed above
        raise SystemExit(f"mixcon eval {action}: --json {path}: cannot write the results ({e})") from e
