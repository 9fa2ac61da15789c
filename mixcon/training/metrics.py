"""Training metrics: a JSON Lines file, a loss-curve PNG and, when installed, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mixcon.io import save_figure_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
PLOTTED = ("step", "loss", "val_loss", "val_bpb")  # what the logger keeps in memory of each record
PLOT_POINTS = 2000  # at most this many train-loss points are drawn (evenly spaced; the EMA is of all)


class MetricsLogger:
    """Appends one JSON object per line to `RUN/metrics.jsonl` (train records have "loss", validation
    records "val_loss"; null for a value that is not a finite number), mirrors scalars to TensorBoard when asked,
    and plots the loss curves. `records` keep only the plotted fields (`PLOTTED`), so a long run's history stays
    small in memory."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, resume_validated: bool = True,
                 tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            # Keep the history up to the checkpoint; what a crashed run logged after it is redone: a validation of
            # `resume_step` too, unless the checkpoint holds it (`resume_validated`; a final validation is logged
            # before the checkpoint that records it).
            kept = [r for r in read_metrics(self.path) if r["step"] < resume_step or (
                r["step"] == resume_step and (resume_validated or "val_loss" not in r))]
            write_text_atomic(self.path, "".join(_json_line(r) for r in kept))
            self.records = [_plotted(r) for r in kept]
        else:
            if resume_step is None:  # a new run: no plot of another run's records is left beside its log
                (self.run_dir / PLOT_FILE).unlink(missing_ok=True)
            write_text_atomic(self.path, "")
        # TensorBoard hides what a crashed run logged after the checkpoint (or, for a new run, an old run's events).
        purge_step = resume_step + 1 if resume_step is not None else 0
        self.tb = _tensorboard_writer(self.run_dir / TENSORBOARD_DIR, purge_step) if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(_plotted(record))
        with self.path.open("a") as f:
            f.write(_json_line(record))
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def plot(self) -> Path:
        return plot_losses(self.records, self.run_dir / PLOT_FILE)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_line(record: dict[str, Any]) -> str:
    """A record as a line of strict JSON: a value that is not a finite number (the LM loss of a batch that scores
    no token; a diverged loss) is null."""
    return json.dumps(_strict(record), allow_nan=False) + "\n"


def _strict(value: Any) -> Any:
    """`value` with every float that is not finite, at any depth, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plotted(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record[key] for key in PLOTTED if key in record}


def require_tensorboard() -> Any:
    """torch's TensorBoard SummaryWriter class; an ImportError saying what to install when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard logging needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter


def _tensorboard_writer(log_dir: Path, purge_step: int) -> Any:
    return require_tensorboard()(str(log_dir), purge_step=purge_step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file. A last line cut short (a run killed while appending it) is left out:
    a resumed run redoes every step after its checkpoint anyway."""
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg}): {line[:80]!r}") from e
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):  # (a line added by hand)
            raise ValueError(f"{path}:{number}: not a metrics record (a JSON object with an integer step): "
                             f"{line[:80]!r}")
        records.append(record)
    return records


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Train loss (raw and smoothed) and validation loss against step, the last validation's bits per byte in the
    title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if _finite(r.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        every = _thinned(len(steps))  # a constant cost per plot, however long the run
        ax.plot([steps[i] for i in every], [losses[i] for i in every], color="tab:blue", alpha=0.3, linewidth=0.8,
                label="train loss")
        ema = _ema(losses)
        ax.plot([steps[i] for i in every], [ema[i] for i in every], color="tab:blue", linewidth=1.5,
                label="train loss (EMA)")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.5, markersize=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    bpb = [(r["step"], r["val_bpb"]) for r in records if r.get("val_bpb") is not None]
    if bpb:
        ax.set_title(f"final validation: {bpb[-1][1]:.3f} bits per byte")
    path = Path(path)
    save_figure_atomic(fig, path)
    return path


def _thinned(n: int, limit: int = PLOT_POINTS) -> list[int]:
    """At most `limit` indices of n points, evenly spaced, the first and the last among them."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _ema(values: tuple[float, ...], alpha: float = 0.1) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out
