"""Layer speed, side by side in one process: Conba variants vs transformers' Mamba2 mixer vs the loop.

Shapes default to the issue's: hidden 512, 16 heads × 64, state 128, chunk 64 (fp32 on a CPU;
`--device cuda --dtype bf16` on a GPU).
FLOPs are counted from the shapes (the products of the projections and of the chunked algorithm as it
computes them; the backward pass as twice the forward; the training step by torch's FlopCounterMode) and
reported against the measured matmul peak (`matmul_peak_gflops` in the JSON; the training step's against
the best of that and a second measurement, `train_matmul_peak_gflops`). Memory: `peak_MiB`
is the most one call holds above what was in use before it (CUDA's allocator peak; on Linux CPUs the
resident peak), `saved_MiB` what autograd saves for backward beyond the layer's weights and input. On
CUDA with triton installed, `+triton` rows time the forward of the Triton kernel (`conba_kernel="triton"`).
All layers of one shape and mode are timed in rounds that call each once (`interleaved_median_seconds`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mixcon.benchmarks.common import (
    SavedBytes,
    add_device_arguments,
    add_out_argument,
    apply_precision,
    interleaved_median_seconds,
    matmul_peak_gflops,
    median_seconds,
    new_figure,
    peak_memory,
    print_table,
    release_memory,
    save_figure,
    triton_default,
    write_results,
)
from mixcon.cli.common import number_type
from mixcon.config import MixConConfig
from mixcon.layers.conba import Conba
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops import conba_scan_reference
from mixcon.ops.dtypes import DTYPES
from mixcon.training.optim import build_optimizer

SSD = dict(conba_selective="linear", conba_state_scaling=False, conba_control=False, conba_delay=0)
VARIANTS: dict[str, dict[str, Any]] = {
    "conba-ssd": SSD,  # control off, tau = 0: Mamba-2's SSD
    "conba-ssd-tau2": {**SSD, "conba_delay": 2},
    "conba-control": {**SSD, "conba_control": True},
    "conba-control-tau2": {**SSD, "conba_control": True, "conba_delay": 2},
    "conba-full": {},  # every mechanism: SwiGLU Sel, scaling, control, tau = 2
}


COLUMNS = ["layer", "T", "B", "mode", "tokens_per_s", "ms", "gflops", "peak_frac", "peak_MiB", "saved_MiB", "note"]


def layer_config(d_model: int = 512, **overrides: Any) -> MixConConfig:
    return MixConConfig.preset("small", d_model=d_model, conba_expand=2, conba_head_dim=64, conba_state=128,
                               conba_groups=1, conba_chunk=64, **overrides)


def scan_flops(B: int, T: int, H: int, P: int, N: int, C: int, delta_rule: bool, tau: int, G: int = 1) -> float:
    """FLOPs (2 per multiply-add) of the chunked Conba scan's forward products as `ops.chunk` computes them, from
    the shapes: per chunk of C steps (T when shorter, as there), the products that the H/G heads of a group share
    once per group (G), the rest per head; the delta rule's unit-triangular solve with C right-hand sides as C³;
    and the first τ steps' readout of the initial past states."""
    C = max(1, min(C, T))
    R = C + min(tau, C) if tau > 0 else C  # query rows read out per chunk: y_t, and the delayed readout's rows
    # whose S_{t-τ} lies in an earlier chunk (the others share y_t's products)
    group = 2 * R * C * N  # Q Kᵀ
    head = 2 * R * C * P + 2 * R * N * P + 2 * C * P * N  # (Q Kᵀ ∘ L) U, Q Sᵀ, the chunk's write (w∘U)ᵀ K
    if delta_rule:
        group += 2 * C * C * N  # K Kᵀ
        head += C**3 + 2 * C * C * P + 2 * C * C * N + 2 * C * N * P  # solve, inv (β X), inv (β e^b K), W Sᵀ
    early = 2 * min(tau, T) * H * P * N
    return B * (-(-T // C) * (G * group + H * head) + early)


def mamba2_scan_flops(B: int, T: int, H: int, P: int, N: int, C: int) -> float:
    """FLOPs of transformers' Mamba2 torch path's products (its SSD with C and B repeated over the heads)."""
    nc = -(-T // C)
    per_chunk = 2 * C * C * N + 2 * C * C * P + 4 * C * N * P  # C Bᵀ, its product with X, chunk states, readout
    return B * H * (nc * per_chunk + 2 * (nc + 1) ** 2 * P * N)  # + states passed between all pairs of chunks


def linear_flops(module: torch.nn.Module, tokens: int) -> float:
    """FLOPs of every nn.Linear in `module` applied to `tokens` rows."""
    return tokens * sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def layer_flops(module: torch.nn.Module, config: MixConConfig, B: int, T: int, backward: bool) -> float:
    """FLOPs of one call of a timed layer (a Conba layer, or transformers' Mamba2 mixer at its shapes): its
    projections and its scan's products; a backward counts as twice the forward, as usual."""
    H, P, N, C = config.conba_heads, config.conba_head_dim, config.conba_state, config.conba_chunk
    if isinstance(getattr(module, "_orig_mod", module), Conba):
        scan = scan_flops(B, T, H, P, N, C, config.conba_control, config.conba_delay, config.conba_groups)
    else:
        scan = mamba2_scan_flops(B, T, H, P, N, C)
    return (linear_flops(module, B * T) + scan) * (3 if backward else 1)


def mamba2_mixer(config: MixConConfig) -> torch.nn.Module | None:
    """transformers' Mamba2Mixer at the same shapes, or None when transformers is absent."""
    try:
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer
    except ImportError:
        return None
    mcfg = Mamba2Config(hidden_size=config.d_model, num_heads=config.conba_heads, head_dim=config.conba_head_dim,
                        state_size=config.conba_state, n_groups=config.conba_groups, expand=config.conba_expand,
                        conv_kernel=config.conba_conv, chunk_size=config.conba_chunk, use_conv_bias=True,
                        use_bias=False, layer_norm_epsilon=config.norm_eps, num_hidden_layers=1)
    return Mamba2Mixer(mcfg, layer_idx=0)


def reference_layer(config: MixConConfig) -> torch.nn.Module:
    """The Conba SSD layer with the sequential reference loop in place of the chunked scan."""
    layer = Conba(config, 0)
    layer.scan_fn = conba_scan_reference
    return layer


def layer_step(module: torch.nn.Module, u: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call of the layer on the input `u` (B, T, d): forward without autograd, or forward and backward."""
    u = u.detach().requires_grad_(backward)

    def step() -> None:
        if backward:
            module(u).sum().backward()
        else:
            with torch.no_grad():
                module(u)
    return step


def memory(module: torch.nn.Module, u: torch.Tensor, backward: bool) -> tuple[int, int | None]:
    """(bytes saved for backward, peak bytes above the memory in use before: `peak_memory`) of one call on `u`."""
    peak = peak_memory(layer_step(module, u, backward), str(u.device))
    saved = 0
    if backward:
        u = u.detach().requires_grad_()
        with SavedBytes(u, *module.parameters()) as counter:
            module(u).sum()
        saved = counter.nbytes
    return saved, peak


def train_step_row(batch: int, T: int, repeats: int, peak: float, device: str, dtype: torch.dtype,
                   compiled: bool = False) -> dict[str, Any]:
    """One AdamW training step of the `small` preset as the trainer takes it (its optimizer, bf16 autocast when dtype is
    bf16; `compiled`: each layer torch.compile'd, as `mixcon train --compile`): achieved FLOP/s.

    FLOPs are those PyTorch's FlopCounterMode counts in the step (matmuls, attention), not a formula.
    """
    torch.manual_seed(0)
    config = MixConConfig.preset("small")
    model = MixConForCausalLM(config).to(device)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, config.vocab_size, (batch, T + 1), device=device)
    amp = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step() -> None:
        with amp:
            loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The math attention backend decomposes into matmuls that the counter knows at any head grouping.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step()  # eager: what the counter sees
    if compiled:
        for layer in model.layers:
            layer.compile()
    seconds = median_seconds(step, repeats=repeats, warmup=2 if compiled else 1)
    gflops = counter.get_total_flops() / seconds / 1e9
    return dict(layer="small train step" + ("+compile" if compiled else ""), T=T, B=batch, mode="train",
                tokens_per_s=batch * T / seconds, ms=seconds * 1e3, gflops=gflops, peak_frac=gflops / peak,
                peak_MiB=mib(peak_memory(step, device)))


def mib(nbytes: int | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if nbytes is None else nbytes / 2**20


def run(lengths: list[int], batches: list[int], repeats: int, reference_max_T: int, out_dir: Path | None,
        device: str = "cpu", dtype: torch.dtype = torch.float32, compiled: bool = False,
        train_shape: tuple[int, int] | None = None, triton: bool | None = None) -> list[dict[str, Any]]:
    """Time every layer at every (T, B); `compiled` adds torch.compile'd Conba variants, `triton` (default:
    on CUDA when triton is installed) the forwards of `conba_kernel="triton"` variants."""
    torch.manual_seed(0)
    peak_n = 8192 if device.startswith("cuda") else 2048
    peak = matmul_peak_gflops(n=peak_n, device=device, dtype=dtype)
    print(f"matmul peak: {peak:.1f} GFLOP/s on {device} {dtype} ({torch.get_num_threads()} threads)")
    base = layer_config()
    modules: dict[str, torch.nn.Module | None] = {"transformers-mamba2": mamba2_mixer(base.replace(**SSD))}
    modules.update({name: Conba(base.replace(**over), 0) for name, over in VARIANTS.items()})
    if compiled:  # five modules share Conba.forward: let each (module, shape) keep its own graph
        torch._dynamo.config.cache_size_limit = 64
        modules.update({f"{name}+compile": torch.compile(Conba(base.replace(**over), 0))
                        for name, over in VARIANTS.items()})
    if triton is None:
        triton = triton_default(device)
    if triton:
        modules.update({f"{name}+triton": Conba(base.replace(**over, conba_kernel="triton"), 0)
                        for name, over in VARIANTS.items()})
    modules["reference-loop"] = reference_layer(base.replace(**SSD))
    for module in modules.values():
        if module is not None:
            module.to(device=device, dtype=dtype)
    rows: list[dict[str, Any]] = []
    train_peak = None

    def save() -> None:
        if out_dir is not None:
            payload = dict(device=device, dtype=str(dtype), matmul_peak_gflops=peak,
                           train_matmul_peak_gflops=train_peak, rows=rows)
            write_results(out_dir, "speed", payload, _plot)

    for T in lengths:
        for B in batches:
            u = torch.randn(B, T, base.d_model, device=device, dtype=dtype)
            timed = {name: module for name, module in modules.items()
                     if module is not None and not (name == "reference-loop" and T > reference_max_T)}
            medians = {backward: interleaved_median_seconds(
                {name: layer_step(module, u, backward) for name, module in timed.items()
                 if not (backward and name.endswith("+triton"))},  # no Triton backward
                repeats, dropped_on=(torch.OutOfMemoryError,)) for backward in (False, True)}
            for name, module in timed.items():  # rows layer by layer, fwd then fwd+bwd
                config = base.replace(**VARIANTS.get(name.split("+")[0], SSD))
                for backward in (False,) if name.endswith("+triton") else (False, True):
                    row: dict[str, Any] = dict(layer=name, T=T, B=B, mode="fwd+bwd" if backward else "fwd")
                    seconds = medians[backward].get(name)
                    try:
                        saved, peak_bytes = memory(module, u, backward) if seconds is not None else (0, None)
                    except torch.OutOfMemoryError:
                        seconds = None
                    finally:
                        release_memory()
                    if seconds is None:  # recorded as a result: the layer does not fit here
                        rows.append({**row, "tokens_per_s": None, "note": "out of memory"})
                        continue
                    gflops = layer_flops(module, config, B, T, backward) / seconds / 1e9
                    rows.append({**row, "tokens_per_s": B * T / seconds, "ms": seconds * 1e3, "gflops": gflops,
                                 "peak_frac": gflops / peak, "peak_MiB": mib(peak_bytes),
                                 "saved_MiB": mib(saved) if backward else None})
            print_table([r for r in rows if r["T"] == T and r["B"] == B], COLUMNS)
            print()
            save()  # after every shape, so that a run stopped early keeps what it measured
    if train_shape is not None:
        train_peak = max(peak, matmul_peak_gflops(n=peak_n, device=device, dtype=dtype))  # again, nearer the step
        print(f"matmul peak, best of both measurements: {train_peak:.1f} GFLOP/s")
        for compile_layers in (False, True) if compiled else (False,):
            rows.append(train_step_row(*train_shape, repeats, train_peak, device, dtype, compile_layers))
            print_table(rows[-1:], COLUMNS)
            save()
    _ratios(rows)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput of each Conba variant over transformers' Mamba2 at the same shape."""
    base = {(r["T"], r["B"], r["mode"]): r["tokens_per_s"] for r in rows
            if r["layer"] == "transformers-mamba2" and r["tokens_per_s"]}
    for r in rows:
        key = (r["T"], r["B"], r["mode"])
        if r["layer"].startswith("conba") and key in base and r["tokens_per_s"]:
            print(f"{r['layer']:20s} T={r['T']:5d} B={r['B']} {r['mode']:8s} {r['tokens_per_s'] / base[key]:.2f}x "
                  f"transformers-mamba2")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Tokens/s against T, forward and forward+backward: a line per layer and batch size (solid at the smallest)."""
    fig, axes = new_figure(2, width=11)
    batches = sorted({r["B"] for r in rows})
    styles = {B: ["-", "--", ":", "-."][i % 4] for i, B in enumerate(batches)}
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for n, layer in enumerate(dict.fromkeys(r["layer"] for r in rows)):
            for B in batches:
                pts = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["layer"] == layer and r["mode"] == mode
                             and r["B"] == B and r["tokens_per_s"])
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", linestyle=styles[B], color=f"C{n % 10}",
                            label=f"{layer} B={B}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="tokens/s", title=mode)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=number_type(int, 1, many=True), default="512,2048,8192",
                   help="sequence lengths (default: %(default)s)")
    p.add_argument("--batches", type=number_type(int, 1, many=True), default="1,4",
                   help="batch sizes (default: %(default)s)")
    p.add_argument("--repeats", type=number_type(int, 1), default=3,
                   help="timed repetitions after one warm-up (median; default: %(default)s)")
    p.add_argument("--reference-max-T", type=number_type(int, 0), default=512,
                   help="longest T for the sequential reference loop (it is slow; default: %(default)s)")
    add_out_argument(p)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd Conba variants and train step")
    p.add_argument("--train-step", type=_shape, default="4x512", metavar="BxT",
                   help="also time a training step of the small preset at this batch x length ('' = skip; "
                        "default: %(default)s)")
    add_device_arguments(p)


def _shape(text: str) -> tuple[int, int] | None:
    """'BxT' -> (B, T), both >= 1; '' -> None."""
    if not text:
        return None
    try:
        batch, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        batch = T = 0
    if min(batch, T) < 1:
        raise argparse.ArgumentTypeError(f"expected BxT of integers >= 1, e.g. 4x512; got {text!r}")
    return batch, T


def main(args: argparse.Namespace) -> int:
    apply_precision(args)
    run(args.lengths, args.batches, args.repeats, args.reference_max_T, args.out, device=args.device,
        dtype=DTYPES[args.dtype], compiled=args.compile, train_shape=args.train_step)
    return 0
