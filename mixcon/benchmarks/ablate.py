"""Ablations: the model of --config and variants of it, each trained from scratch on the same bytes, over seeds.

Every mechanism of Conba and of the MixCon layout is a config switch (DESIGN.md §2), so an ablation is a
run, not a code edit. Each variant is --config with some fields changed; all are trained with the same
recipe on the same random windows of --real-len bytes of --corpus (the bytes tokenizer's vocabulary) and
scored on the same held-out windows from its end, once per seed (the seed fixes the init and the order
of the windows, so seeds pair the variants). Without --variant, the built-in set below runs: Conba's
mechanisms one at a time off, all of them off at once (a Mamba-2 mixer), dense feed-forward layers
instead of MoE, and the pure Conba and pure Transformer layouts. Prints per-variant means over seeds:
held-out bits per byte, its spread across seeds, the paired difference to the base (negative = better),
parameters (total / active per token) and training seconds; writes ablate.json (every run) and
ablate.png.

variants:
  NAME                        a built-in variant, e.g. --variant no-control
  NAME:KEY=VALUE[,KEY=VALUE]  your own: config fields to change, e.g. --variant wide:d_model=48,n_heads=4

built-in variants (run when they change the model of --config):
  no-control        conba_control=false: open-loop state write, Mamba-2's SSD update
  no-delay          conba_delay=0: no delayed-state readout
  linear-selective  conba_selective=linear: the step size from one linear map, as Mamba-2's dt
  no-state-scaling  conba_state_scaling=false: no second forget gate
  no-noise          conba_process_noise=0, conba_observation_noise=0: no training noise
  mamba2-mixer      all five above: every Conba layer a Mamba-2 mixer
  dense-ffn         moe_every=0 (and no moe_pattern): dense SwiGLU MLPs instead of MoE
  conba-twin        attn_per_block=0: no attention
  transformer-twin  attn_per_block=layers_per_block: no Conba
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from mixcon.benchmarks import bytes_lm, common
from mixcon.cli.common import number_type, parse_overrides
from mixcon.config import MixConConfig

CONBA_MECHANISMS = {  # variant name -> the fields, with their values that turn the mechanism off
    "no-control": {"conba_control": False},
    "no-delay": {"conba_delay": 0},
    "linear-selective": {"conba_selective": "linear"},
    "no-state-scaling": {"conba_state_scaling": False},
    "no-noise": {"conba_process_noise": 0.0, "conba_observation_noise": 0.0},
}
BASE = "base"
KEY = ("variant", "seed")  # of a run


def builtin_variants(base: MixConConfig) -> dict[str, dict[str, Any]]:
    """The built-in ablations of `base` (this module's doc says what each is): name -> the fields they change."""
    return {
        **CONBA_MECHANISMS,
        "mamba2-mixer": {key: value for fields in CONBA_MECHANISMS.values() for key, value in fields.items()},
        "dense-ffn": {"moe_every": 0, "moe_pattern": None},
        "conba-twin": base.placement(0),
        "transformer-twin": base.placement(base.layers_per_block),
    }


def parse_variant(text: str, builtin: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """'NAME' (a built-in) or 'NAME:KEY=VALUE[,KEY=VALUE...]' -> (name, fields to change)."""
    name, sep, spec = text.partition(":")
    if not name or name == BASE:
        raise ValueError(f"--variant {text!r}: needs a name other than {BASE!r} (the unchanged --config)")
    if not sep:
        if name not in builtin:
            raise ValueError(f"--variant {text!r}: not a built-in variant ({', '.join(builtin)}); give your own "
                             "as NAME:KEY=VALUE[,KEY=VALUE...]")
        return name, builtin[name]
    return name, parse_overrides(spec.split(","), flag=f"--variant {name}:")


def changes_model(base: MixConConfig, config: MixConConfig) -> bool:
    """Whether `config` builds another model than `base`: some field differs, and not only Conba's when
    neither has a Conba layer."""
    old, new = base.to_dict(), config.to_dict()
    changed = {key for key in old if old[key] != new[key]}
    has_conba = any(mixer == "conba" for c in (base, config) for mixer, _ in c.layout())
    return bool(changed) and (has_conba or any(not key.startswith("conba_") for key in changed))


def variant_configs(base: MixConConfig, variants: dict[str, dict[str, Any]]) -> dict[str, MixConConfig]:
    """The base and each variant's config (validated); a variant that changes nothing in the model is an error."""
    configs = {BASE: base}
    for name, fields in variants.items():
        try:
            config = base.replace(**fields)
        except ValueError as e:
            raise ValueError(f"--variant {name}: {e}") from e
        if not changes_model(base, config):
            raise ValueError(f"--variant {name}: {fields} changes nothing in the model of --config")
        configs[name] = config
    return configs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant (in order of first appearance), means over its seeds; `delta` is the mean over seeds of its
    bits per byte minus the base's at the same seed, `delta_std` the spread of those differences."""
    base = {r["seed"]: r["bits_per_byte"] for r in runs if r["variant"] == BASE}
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        bits = [r["bits_per_byte"] for r in mine]
        deltas = [r["bits_per_byte"] - base[r["seed"]] for r in mine if r["seed"] in base]
        first = mine[0]
        rows.append(dict(variant=name, layout=first["layout"], params=first["params"],
                         active_params=first["active_params"], seeds=len(mine),
                         train_s=statistics.fmean(r["train_s"] for r in mine),
                         bits_per_byte=statistics.fmean(bits),
                         std=statistics.stdev(bits) if len(bits) > 1 else None,
                         delta=statistics.fmean(deltas) if deltas else None,
                         delta_std=statistics.stdev(deltas) if len(deltas) > 1 else None))
    return rows


COLUMNS = ["variant", "layout", "params", "active_params", "seeds", "train_s", "bits_per_byte", "std", "delta",
           "delta_std"]


def run(base: MixConConfig, variants: dict[str, dict[str, Any]], stream: torch.Tensor, seeds: list[int], *,
        real_len: int, steps: int, batch_size: int, lr: float, eval_windows: int, out_dir: Path,
        device: str = "cpu", resume: bool = False) -> list[dict[str, Any]]:
    """Train and score the base and every variant at every seed; returns the per-variant summary.
    out_dir/ablate.json holds every finished run as soon as it ends; `resume` reuses those of an earlier
    call with the same settings (the seeds may differ: the earlier runs stay, and the summary is over all)."""
    configs = variant_configs(base, variants)
    train, held_out = bytes_lm.split_windows(stream, real_len, eval_windows)
    settings = dict(real_len=real_len, steps=steps, batch_size=batch_size, lr=lr, eval_windows=eval_windows,
                    **bytes_lm.stream_settings(stream), device=device, base=base.to_dict(), variants=variants)
    done = common.finished_runs(out_dir, "ablate", settings, key=KEY, field="runs") if resume else {}
    runs = []
    for seed in seeds:
        for name, config in configs.items():
            if (name, seed) in done:
                runs.append(done[name, seed])
                continue
            row = bytes_lm.train_and_score(config, train, held_out, ratio=0.0, steps=steps, batch_size=batch_size,
                                           lr=lr, seed=seed, device=device)
            runs.append(dict(variant=name, seed=seed, **row))
            common.print_table(runs[-1:], list(runs[-1]))
            common.write_results(out_dir, "ablate", _payload(settings, common.with_earlier(runs, done, KEY)),
                                 plot=None)
    runs = common.with_earlier(runs, done, KEY)
    summary = summarize(runs)
    all_seeds = sorted({r["seed"] for r in runs})
    print(f"\nmeans over seeds {', '.join(map(str, all_seeds))} (delta: bits/byte minus the base's at the same seed)")
    common.print_table(summary, COLUMNS)
    common.write_results(out_dir, "ablate", _payload(settings, runs), _plot)
    return summary


def _payload(settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(seeds=sorted({r["seed"] for r in runs}), **settings, runs=runs, rows=summarize(runs))


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Each variant's paired difference to the base (mean ± std over seeds); bars far longer than the
    typical one are cut at the axis and labelled with their value."""
    fig, (ax,) = common.new_figure(width=7.0)
    names = [r["variant"] for r in rows]
    deltas = [r["delta"] or 0.0 for r in rows]
    errors = [r["delta_std"] or 0.0 for r in rows]
    reach = [abs(d) + e for d, e in zip(deltas, errors, strict=True)]
    typical = sorted(reach)[len(reach) // 2]
    limit = 1.2 * max((v for v in reach if v <= 4 * typical), default=0.0) or 1.2 * max(reach) or 1.0
    cut = [abs(d) + e > limit for d, e in zip(deltas, errors, strict=True)]
    shown = [max(-limit, min(limit, d)) if c else d for d, c in zip(deltas, cut, strict=True)]
    ax.barh(names, shown, xerr=[0.0 if c else e for e, c in zip(errors, cut, strict=True)], capsize=3,
            color=["tab:green" if d < 0 else "tab:red" for d in deltas])
    for y, (d, c) in enumerate(zip(deltas, cut, strict=True)):
        if c:
            ax.text(0.97 * (limit if d > 0 else -limit), y, f"{d:+.3f}", va="center", ha="right" if d > 0 else "left",
                    color="white", fontsize=8)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlim(-limit, limit)
    ax.invert_yaxis()
    ax.set(xlabel="bits per byte minus the base's at the same seed (mean ± std; < 0: better)",
           title=f"ablations of the base ({rows[0]['bits_per_byte']:.3f} held-out bits per byte)")
    ax.grid(alpha=0.3, axis="x")
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="SPEC",
                   help="a variant to run beside the base: NAME or NAME:KEY=VALUE[,...] (repeatable; "
                        "default: every built-in)")
    p.add_argument("--seeds", type=number_type(int, 0, maximum=2**64 - 2, many=True), default="0,1,2",
                   help="seeds, each a run of every variant (default: %(default)s)")
    bytes_lm.add_arguments(p, window="bytes per window")
    common.add_resume_argument(p, "ablate")


def main(args: argparse.Namespace, base: MixConConfig) -> int:
    try:
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds {','.join(map(str, args.seeds))}: each seed once")
        builtin = builtin_variants(base)
        if args.variants:
            variants = dict(parse_variant(v, builtin) for v in args.variants)
            if len(variants) != len(args.variants):
                raise ValueError("--variant: each name once")
        else:  # the built-ins that change this model
            variants = {name: fields for name, fields in builtin.items()
                        if changes_model(base, base.replace(**fields))}
        variant_configs(base, variants)  # fail on a bad variant before any training
        stream = bytes_lm.byte_stream(args.corpus, args.max_bytes, [args.out])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mixcon bench ablate: {e}") from e
    common.run_or_exit("ablate", lambda: run(
        base, variants, stream, args.seeds, real_len=args.real_len, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, eval_windows=args.eval_windows, out_dir=args.out, device=args.device, resume=args.resume))
    return 0
