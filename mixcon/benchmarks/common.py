"""Timing, machine peaks and result files shared by the benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mixcon.cli.common import add_available_device_argument, add_dtype_argument, number_type, output_folder
from mixcon.config import MixConConfig
from mixcon.io import save_figure_atomic, write_text_atomic
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.training.optim import build_optimizer, lr_at, set_lr


def seconds_of(fn: Callable[[], Any]) -> float:
    """Wall time of one call of `fn`, the device's queued work included."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def wall_times(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, min_seconds: float = 0.0) -> list[float]:
    """Wall times of `fn` after warm-up (repeats more while under min_seconds in total)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        times.append(seconds_of(fn))
    return times


def interleaved_median_seconds(fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1,
                               dropped_on: tuple[type[BaseException], ...] = ()) -> dict[str, float]:
    """Median wall time of each of `fns`, after warm-up, timed in rounds that call each once, in alternating order:
    a machine's drift over the run reaches every one alike (timing one after the other, it lands on whichever ran
    then). A function that raises one of `dropped_on` (out of memory, say) is left out of the later calls and of
    the result, and the memory it held is released."""
    live = dict(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str) -> float | None:
        try:
            return seconds_of(live[name])
        except dropped_on:
            del live[name]
            release_memory()
            return None

    for name in list(live):
        for _ in range(warmup):
            if name in live:
                call(name)
    for r in range(repeats):
        for name in (list(live) if r % 2 == 0 else list(live)[::-1]):
            seconds = call(name)
            if seconds is not None:
                times[name].append(seconds)
    return {name: statistics.median(times[name]) for name in live}


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, min_seconds: float = 0.0) -> float:
    """Median wall time of `fn` after warm-up (repeats more while under min_seconds in total)."""
    return statistics.median(wall_times(fn, repeats, warmup, min_seconds))


def twins(base: MixConConfig) -> dict[str, MixConConfig]:
    """MixCon and its pure Transformer and pure Conba twins (same widths; a pure layout has one placement,
    so the twins drop any `layer_pattern`)."""
    return {"mixcon": base,
            "transformer-twin": base.replace(**base.placement(base.layers_per_block)),
            "conba-twin": base.replace(**base.placement(0))}


TWIN_NAMES = ("mixcon", "transformer-twin", "conba-twin")  # the keys of `twins`


DEFAULT_OUT = Path("docs/bench")  # where the benchmarks that keep their results write them


def add_training_arguments(p: argparse.ArgumentParser, *, steps: int, batch_size: int, unit: str) -> None:
    """--steps, --batch-size (of `unit`), --lr, --device, --out: the probes that train models briefly
    (`train_briefly`)."""
    p.add_argument("--steps", type=number_type(int, 1), default=steps,
                   help="training steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=number_type(int, 1), default=batch_size,
                   help=f"{unit} per step (default: %(default)s)")
    p.add_argument("--lr", type=number_type(float, 0, above=True), default=3e-3,
                   help="peak learning rate (default: %(default)s)")
    add_available_device_argument(p)
    add_out_argument(p)


def add_out_argument(p: argparse.ArgumentParser, default: Path | None = DEFAULT_OUT) -> None:
    """--out: the folder of a benchmark's JSON and PNG (None: none written unless given)."""
    p.add_argument("--out", type=output_folder, default=default,
                   help=f"folder of the JSON and PNG results (default: {default or 'none, nothing written'})")


def add_twin_arguments(p: argparse.ArgumentParser) -> None:
    """--models and --seed: the probes that train MixCon and its twins."""
    p.add_argument("--models", default=",".join(TWIN_NAMES), help="which of the twins to train (default: %(default)s)")
    p.add_argument("--seed", type=number_type(int, 0, maximum=2**64 - 2), default=0,  # held-out data: seed + 1
                   help="seed of the models' initial weights and of the training data (default: 0)")


def twin_names(models: str) -> list[str]:
    """The --models list, checked against the twins' names."""
    names = models.split(",")
    if unknown := sorted(set(names) - set(TWIN_NAMES)):
        raise ValueError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(TWIN_NAMES)}")
    return names


def train_briefly(model: MixConForCausalLM, next_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                  *, steps: int, lr: float, seed: int = 0) -> list[float]:
    """AdamW (warmup over the first tenth, cosine to lr / 10, weight decay 0.1, gradients clipped at 1) on
    `next_batch(generator)` -> (ids, labels) batches drawn from one generator seeded with `seed`; returns
    the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(steps):
        set_lr(optimizer, lr_at(step, peak=lr, warmup=max(1, steps // 10), total=steps, min_ratio=0.1))
        ids, labels = next_batch(generator)
        loss = model(ids.to(device), labels=labels.to(device), return_logits=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def release_memory() -> None:
    """Give freed memory back between measurements: glibc keeps freed blocks of large activations in
    its arenas (at T = 8192, B = 4 a layer's resident memory crept up ~0.3 GB per training step)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: resident peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def peak_memory(fn: Callable[[], Any], device: str) -> int | None:
    """Bytes of memory one call of `fn` holds at its peak above what was held before it: the CUDA caching
    allocator's peak on a GPU; on Linux, the process's resident peak (VmHWM, reset through
    /proc/self/clear_refs) over its resident size before the call; None where neither can be read."""
    release_memory()
    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def triton_default(device: str) -> bool:
    """Whether the benchmarks time the Triton kernel unless told: on CUDA, with triton installed."""
    return device.startswith("cuda") and importlib.util.find_spec("triton") is not None


def plot_file(text: str) -> Path:
    """argparse type of a figure to write: its folder exists and matplotlib (imported only here, it is
    optional) writes its suffix; checked before any work, so that a long run does not fail at its end. '~' is the
    home folder."""
    path = Path(text).expanduser()
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise argparse.ArgumentTypeError("drawing needs matplotlib (pip install matplotlib)") from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lower().removeprefix(".") not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: the suffix must be one of matplotlib's formats: "
                                         f"{', '.join('.' + f for f in formats)}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no folder {path.parent}")
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, shared by the benchmarks; and --fp32-precision (`apply_precision`)."""
    add_available_device_argument(p)
    add_dtype_argument(p)
    add_precision_argument(p)


def add_precision_argument(p: argparse.ArgumentParser, when: str = "timing") -> None:
    """--fp32-precision, set (`apply_precision`) before `when`."""
    p.add_argument("--fp32-precision", choices=["highest", "high"], default=None,
                   help=f"torch.set_float32_matmul_precision before {when} (high: fp32 matmuls, and the Triton scan "
                        "kernel's fp32 inputs, multiplied in TF32; default: torch's own, 'highest')")


def apply_precision(args: argparse.Namespace) -> None:
    """The --fp32-precision of `add_precision_argument`, if given (recorded in every result's `machine`)."""
    if args.fp32_precision is not None:
        torch.set_float32_matmul_precision(args.fp32_precision)


class TokenClock:
    """A generation streamer that stamps the wall time at which each token is ready.

    Works as mixcon's `streamer=` callback and as a transformers streamer (`put`/`end`).
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: object) -> None:
        sync()
        self.stamps.append(time.perf_counter())

    __call__ = put

    def end(self) -> None:
        pass


def matmul_peak_gflops(n: int = 2048, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Measured throughput of one n×n matmul: the machine's practical FLOP peak, the best of 10 (a cloud VM's
    slow phases would otherwise lower the peak and flatter every fraction of it). fp16 on a CPU, which has no
    fast kernels for it (~2 GFLOP/s), at n <= 512, so as not to take minutes."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        n = min(n, 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(wall_times(lambda: a @ b, repeats=10, warmup=2)) / 1e9


def copy_bandwidth_gbs(mbytes: int = 256, device: str = "cpu") -> float:
    """Measured bandwidth of a large copy (bytes read + bytes written per second)."""
    src = torch.empty(mbytes * 2**20 // 4, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=5, warmup=2)
    return 2 * src.nbytes / seconds / 1e9


def stream_read_gbs(mbytes: int = 256, device: str = "cpu") -> float:
    """Measured read bandwidth of a sum over a large tensor (bytes read per second, all threads): the
    fastest a decoding step could stream its weights and cache."""
    x = torch.empty(mbytes * 2**20 // 4, device=device).normal_()
    seconds = median_seconds(x.sum, repeats=7, warmup=2)
    return x.nbytes / seconds / 1e9


class SavedBytes:
    """Counts the bytes autograd saves for backward: the activation memory of a training step, beyond the
    tensors in `held` (weights and inputs, which exist whether or not a backward follows)."""

    def __init__(self, *held: torch.Tensor) -> None:
        self.nbytes = 0
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in held}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        # Detached: a saved output holding itself (and so its grad_fn) would be a reference cycle
        # through autograd that Python's collector cannot see, and the graph would never be freed.
        return t.detach()

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


@functools.cache  # (asked at every results file a run writes)
def _cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def _version(package: str) -> str | None:
    """An installed package's version, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _mixcon_version() -> str:
    """mixcon's version, with the git commit of its source checkout when it runs from one (a trailing '+dirty':
    uncommitted changes)."""
    from mixcon import __version__

    source = Path(__file__).resolve().parents[2]  # the checkout holding mixcon/, or site-packages

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # (an installed copy may lie inside some other repository)
    if top is None or Path(top).resolve() != source:
        return __version__
    return f"{__version__} ({git('describe', '--always', '--dirty=+dirty', '--exclude=*')})"


# Environment variables that change CPU timings: glibc's allocator (docs/benchmarks.md §38), a preloaded allocator and
# its settings, the thread pools.
TIMING_ENVIRONMENT = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                      "KMP_AFFINITY", "KMP_BLOCKTIME")


def machine() -> dict[str, Any]:
    """Where and how a result was measured: the machine, the software, the process's command line and those of the
    `TIMING_ENVIRONMENT` variables that are set."""
    return {
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],  # `mixcon bench ...` as typed (a library call: its caller)
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("transformers", "triton")},
        "mixcon": _mixcon_version(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "environment": {name: os.environ[name] for name in TIMING_ENVIRONMENT if name in os.environ},
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return "-" if v is None else str(v)


def new_figure(ncols: int = 1, width: float = 6.0) -> tuple[Any, list[Any]]:
    """A headless matplotlib figure with `ncols` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, 4), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (atomically) and close a figure from `new_figure`."""
    save_figure_atomic(fig, path, dpi=120)


def write_results(out_dir: Path, name: str, payload: dict[str, Any],
                  plot: Callable[[list[dict[str, Any]], Path], None] | None) -> None:
    """Write NAME.json (`machine()`, then the payload, rows included; atomically) and NAME.png (drawn by
    `plot`, unless None) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_text_atomic(path, json.dumps({"machine": machine(), **payload}, indent=2))
    if plot is not None:
        plot(payload["rows"], out_dir / f"{name}.png")
        print(f"wrote {path} and {out_dir / f'{name}.png'}")


class UsageError(ValueError):
    """The command's arguments cannot work, found once it runs: a --resume with no earlier run of the
    same settings in --out, a corpus too short for the windows asked."""


def add_resume_argument(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out: reuse the finished runs in --out/{name}.json (written as each "
                        "run ends) when its settings match; an error when there is none")


def finished_runs(out_dir: Path, name: str, settings: dict[str, Any], key: tuple[str, ...],
                  field: str = "rows") -> dict[tuple[Any, ...], dict[str, Any]]:
    """The runs in out_dir/NAME.json (its list `field`) by their values of `key`; UsageError when there is no
    such file or it was written with other `settings` (each a top-level entry there)."""
    path = out_dir / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"--resume: no earlier run in {out_dir} (no {path.name} there); give --out the folder of "
                         "the run to resume, or drop --resume to start afresh")
    saved = json.loads(path.read_text())
    expected = json.loads(json.dumps(settings))  # as JSON stores them (tuples as lists, None as null)
    if differ := [k for k in expected if saved.get(k) != expected[k]]:
        raise UsageError(f"--resume: {path} was written with other {', '.join(differ)}; drop --resume to start "
                         "afresh there, or give another --out")
    return {tuple(r[k] for k in key): r for r in saved[field]}


def with_earlier(rows: list[dict[str, Any]], done: dict[tuple[Any, ...], dict[str, Any]], key: tuple[str, ...]
                 ) -> list[dict[str, Any]]:
    """This call's rows, then those of `finished_runs` that it has not reused: a --resume that asks for other
    models, ratios or seeds adds to the results in --out instead of dropping the earlier ones."""
    have = {tuple(r[k] for k in key) for r in rows}
    return rows + [r for k, r in done.items() if k not in have]


def run_or_exit(command: str, run: Callable[[], Any]) -> None:
    """`run()`, with a UsageError as a one-line exit; any other error keeps its traceback."""
    try:
        run()
    except UsageError as e:
        raise SystemExit(f"mixcon bench {command}: {e}") from e
