"""Uninformative tokens: MixCon and its Transformer and Conba twins on text with filler tokens inserted.

Gu ("On the Tradeoffs of SSMs and Transformers", 2025) asks how sequence models cope with tokens that
carry nothing. At each --ratios value, each twin of --config (same widths, the bytes tokenizer's
vocabulary) is trained from scratch on windows of --real-len bytes of --corpus with round(ratio ×
real-len) filler tokens (the tokenizer's PAD id, which text never yields) inserted at random places;
every real byte's target is the next real byte, fillers are never targets. The held-out loss over the
same real bytes with fillers at the same ratio follows, in bits per byte: a model that ignored the
fillers perfectly would score the same at every ratio. A Conba layer can learn to neither decay nor
write on a filler; attention must learn to put no weight on one. Prints a table; writes filler.json
(after each run, so --resume can continue an interrupted sweep) and filler.png (bits per byte vs ratio).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mixcon.benchmarks import bytes_lm, common
from mixcon.config import MixConConfig
from mixcon.data.synthetic import filled_length

COLUMNS = ["model", "ratio", "seq_len", "train_s", "final_loss", "bits_per_byte"]
KEY = ("model", "ratio")  # of a run


def run(base: MixConConfig, stream: torch.Tensor, ratios: list[float], *, real_len: int, steps: int,
        batch_size: int, lr: float, eval_windows: int, seed: int, out_dir: Path, device: str = "cpu",
        models: list[str] | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Train each twin of `base` (those in `models`, default all) at every ratio, then score it there.
    out_dir/filler.json holds every finished run as soon as it ends; `resume` reuses those of an earlier
    call with the same settings (ratios and models may differ: the earlier runs stay)."""
    train, held_out = bytes_lm.split_windows(stream, real_len, eval_windows)
    settings = dict(real_len=real_len, steps=steps, batch_size=batch_size, lr=lr, eval_windows=eval_windows,
                    seed=seed, **bytes_lm.stream_settings(stream), device=device, base=base.to_dict())
    done = common.finished_runs(out_dir, "filler", settings, key=KEY) if resume else {}
    rows = []
    for ratio in ratios:
        for name, config in common.twins(base).items():
            if models is not None and name not in models:
                continue
            if (name, ratio) in done:
                rows.append(done[name, ratio])
                continue
            row = bytes_lm.train_and_score(config, train, held_out, ratio=ratio, steps=steps,
                                           batch_size=batch_size, lr=lr, seed=seed, device=device)
            rows.append(dict(model=name, ratio=ratio, seq_len=filled_length(real_len, ratio), **row))
            common.print_table(rows[-1:], COLUMNS)
            common.write_results(out_dir, "filler", _payload(settings, common.with_earlier(rows, done, KEY)),
                                 plot=None)
    rows = common.with_earlier(rows, done, KEY)
    common.write_results(out_dir, "filler", _payload(settings, rows), _plot)
    return rows


def _payload(settings: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(ratios=sorted({r["ratio"] for r in rows}), **settings, rows=rows)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = common.new_figure()
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        ax.plot([r["ratio"] for r in mine], [r["bits_per_byte"] for r in mine], marker="o", label=name)
    ax.set(xlabel="filler tokens per real byte", ylabel="held-out bits per byte (real bytes)",
           title="next-byte loss among uninformative tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratios", default="0,1,3", help="filler tokens per real byte (default: %(default)s)")
    bytes_lm.add_arguments(p, window="real bytes per window")
    common.add_twin_arguments(p)
    common.add_resume_argument(p, "filler")


def main(args: argparse.Namespace, base: MixConConfig) -> int:
    try:
        try:
            ratios = sorted({float(r) for r in args.ratios.split(",")})
        except ValueError as e:
            raise ValueError(f"--ratios {args.ratios!r}: expected comma-separated numbers") from e
        for ratio in ratios:
            try:
                filled_length(args.real_len, ratio)
            except ValueError as e:
                raise ValueError(f"--ratios {args.ratios}: {e}") from None
        models = common.twin_names(args.models)
        stream = bytes_lm.byte_stream(args.corpus, args.max_bytes, [args.out])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mixcon bench filler: {e}") from e
    common.run_or_exit("filler", lambda: run(
        base, stream, ratios, real_len=args.real_len, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        eval_windows=args.eval_windows, seed=args.seed, out_dir=args.out, device=args.device, models=models,
        resume=args.resume))
    return 0
