"""Multi-query associative recall (MQAR): MixCon and its Transformer and Conba twins, trained side by side.

Trains the model of --config and its Transformer and pure-Conba twins (same widths, vocabulary = the
task's) on one stream of MQAR batches, each with a pair count drawn from --pairs, then scores every
model on the same held-out sequences at each pair count: the fraction of asked keys whose value is
the model's top prediction. Attention can look any key up at a cost that grows with the context; a
Conba layer must hold every pair in its fixed (heads × P × N) state. Prints a table; writes
recall.json (after each model, so --resume can continue an interrupted run) and recall.png (accuracy vs
pairs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from mixcon.benchmarks import common
from mixcon.cli.common import number_type
from mixcon.config import MixConConfig
from mixcon.data.synthetic import RecallTask
from mixcon.evaluation.recall import recall_accuracy
from mixcon.models.mixcon import MixConForCausalLM

KEY = ("model",)  # of a run


def train_on_recall(model: MixConForCausalLM, task: RecallTask, pairs: list[int], *, steps: int, batch_size: int,
                    lr: float, seed: int = 0) -> list[float]:
    """`common.train_briefly` on freshly drawn MQAR batches, the pair count of each drawn from `pairs`;
    returns the loss of every step."""

    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        num_pairs = pairs[int(torch.randint(len(pairs), (), generator=generator))]
        return task.sample(batch_size, num_pairs, generator)

    return common.train_briefly(model, batch, steps=steps, lr=lr, seed=seed)


def run(base: MixConConfig, task: RecallTask, pairs: list[int], steps: int, batch_size: int, lr: float,
        sequences: int, seed: int, out_dir: Path, device: str = "cpu",
        models: list[str] | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Train each twin of `base` (those named in `models`, default all) on `task`, then score it at every
    pair count. out_dir/recall.json holds every finished model as soon as it is scored; `resume`
    reuses those of an earlier call with the same settings (the models may differ: the earlier ones stay)."""
    settings = dict(task=dict(vocab_size=task.vocab_size, seq_len=task.seq_len, keys=task.keys, values=task.values),
                    pairs=pairs, steps=steps, batch_size=batch_size, lr=lr, sequences=sequences, seed=seed,
                    device=device, base=base.to_dict())
    done = common.finished_runs(out_dir, "recall", settings, key=KEY) if resume else {}
    rows = []
    for name, config in common.twins(base.replace(vocab_size=task.vocab_size)).items():
        if models is not None and name not in models:
            continue
        if (name,) in done:
            rows.append(done[name,])
            continue
        torch.manual_seed(seed)
        model = MixConForCausalLM(config).to(device)
        start = time.perf_counter()
        losses = train_on_recall(model, task, pairs, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        seconds = time.perf_counter() - start
        has_conba = any(mixer == "conba" for mixer, _ in config.layout())
        state = config.conba_heads * config.conba_head_dim * config.conba_state if has_conba else None
        last = losses[-20:]
        row: dict[str, Any] = dict(model=name, layout=config.layout_string(), params=model.num_parameters(),
                                   conba_state_floats=state, train_s=seconds, final_loss=sum(last) / len(last))
        for num_pairs in pairs:  # the held-out sequences come from another seed than training
            row[f"acc@{num_pairs}"] = recall_accuracy(model, task, num_pairs, sequences=sequences,
                                                      seed=seed + 1)
        rows.append(row)
        common.print_table(rows[-1:], list(row))
        common.write_results(out_dir, "recall", dict(**settings, rows=common.with_earlier(rows, done, KEY)),
                             plot=None)
    rows = common.with_earlier(rows, done, KEY)
    common.write_results(out_dir, "recall", dict(**settings, rows=rows), _plot)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = common.new_figure()
    counts = [int(k.removeprefix("acc@")) for k in rows[0] if k.startswith("acc@")]
    for row in rows:
        ax.plot(counts, [row[f"acc@{n}"] for n in counts], marker="o", label=row["model"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set(xlabel="key-value pairs per sequence", ylabel="recall accuracy", ylim=(0, 1.02),
           title="multi-query associative recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=number_type(int, 1, many=True), default="2,4,8,16",
                   help="pair counts, trained on and scored at (default: %(default)s)")
    p.add_argument("--seq-len", type=number_type(int, 4), default=64,
                   help="tokens per sequence, 4 per pair (default: %(default)s)")
    p.add_argument("--vocab", type=number_type(int, 3), default=64,
                   help="task vocabulary: filler, keys, values (default: %(default)s)")
    p.add_argument("--sequences", type=number_type(int, 1), default=512,
                   help="held-out sequences per pair count (default: %(default)s)")
    common.add_training_arguments(p, steps=3000, batch_size=32, unit="sequences")
    common.add_twin_arguments(p)
    common.add_resume_argument(p, "recall")


def main(args: argparse.Namespace, base: MixConConfig) -> int:
    pairs = sorted(set(args.pairs))
    try:
        task = RecallTask(vocab_size=args.vocab, seq_len=args.seq_len)
        if pairs[-1] > task.max_pairs():
            raise ValueError(f"--pairs {','.join(map(str, args.pairs))}: each must be in [1, {task.max_pairs()}] "
                             f"for --vocab {args.vocab} and --seq-len {args.seq_len}")
        models = common.twin_names(args.models)
    except ValueError as e:
        raise SystemExit(f"mixcon bench recall: {e}") from e
    common.run_or_exit("recall", lambda: run(base, task, pairs, args.steps, args.batch_size, args.lr, args.sequences,
                                             args.seed, args.out, args.device, models, resume=args.resume))
    return 0
