"""`mixcon.benchmarks.speed`: the Conba layer against transformers' Mamba2 mixer; FLOPs counted from the shapes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mixcon.benchmarks import speed
from mixcon.cli import main
from mixcon.config import MixConConfig
from mixcon.layers.conba import Conba
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops import conba_scan


def test_speed_benchmark_rows_and_files(tmp_path):
    rows = speed.run([64], [2], repeats=1, reference_max_T=64, out_dir=tmp_path, train_shape=(2, 16))
    layers = {r["layer"] for r in rows}
    assert {"conba-ssd", "conba-full", "reference-loop", "transformers-mamba2", "small train step"} <= layers
    assert all(r["tokens_per_s"] > 0 and r["gflops"] > 0 for r in rows)
    for r in rows:  # the batch's tokens
        assert r["tokens_per_s"] == pytest.approx(r["B"] * r["T"] / (r["ms"] / 1e3)), r
    assert all(r["saved_MiB"] > 0 for r in rows if r["mode"] == "fwd+bwd")
    if sys.platform.startswith("linux"):
        assert all(r["peak_MiB"] >= 0 for r in rows)
    payload = json.loads((tmp_path / "speed.json").read_text())
    assert len(payload["rows"]) == len(rows)
    for r in rows:  # each row's fraction of the peak it was measured against, both in the JSON
        peak = payload["train_matmul_peak_gflops" if r["mode"] == "train" else "matmul_peak_gflops"]
        assert r["peak_frac"] == pytest.approx(r["gflops"] / peak)
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_speed_rows_count_each_variants_flops_and_the_train_step_takes_the_better_peak(tmp_path, monkeypatch):
    """With every call timed at 10 ms, 30 with a backward: a row's GFLOP/s are its layer's FLOPs at the row's shape
    over its own mode's time (a fwd+bwd row 3x its forward's FLOPs), a compiled variant's row the FLOPs of its own
    variant (not the SSD layer's), and the training step's peak is the better of two measurements (n = 2048 on a
    CPU)."""
    monkeypatch.setattr(speed, "layer_step", lambda module, u, backward: lambda: backward)  # says its mode
    monkeypatch.setattr(speed, "interleaved_median_seconds", lambda fns, *a, **k: {
        name: 0.03 if fn() else 0.01 for name, fn in fns.items()})
    monkeypatch.setattr(speed, "memory", lambda module, u, backward: (1, 2))
    peaks, sizes = iter([100.0, 200.0]), []
    monkeypatch.setattr(speed, "matmul_peak_gflops", lambda n, **kwargs: sizes.append(n) or next(peaks))
    trained = []
    monkeypatch.setattr(speed, "train_step_row", lambda *args: trained.append(args) or dict(
        layer="small train step", T=16, B=2, mode="train", tokens_per_s=1.0, gflops=50.0, peak_frac=50.0 / args[3]))
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    rows = speed.run([32], [2], repeats=1, reference_max_T=0, out_dir=tmp_path, compiled=True, train_shape=(2, 16),
                     triton=False)
    assert sizes == [2048, 2048]
    layer_rows = [r for r in rows if r["mode"] != "train"]
    assert all((r["ms"], r["tokens_per_s"]) == pytest.approx((30.0, 2 * 32 / 0.03) if r["mode"] == "fwd+bwd" else
                                                             (10.0, 2 * 32 / 0.01)) for r in layer_rows)
    gflops = {(r["layer"], r["mode"]): r["gflops"] for r in rows}
    for variant, over in speed.VARIANTS.items():
        config = speed.layer_config().replace(**over)
        assert gflops[variant, "fwd"] == pytest.approx(speed.layer_flops(Conba(config, 0), config, 2, 32, False) / 1e7)
    for layer in ("transformers-mamba2", *speed.VARIANTS):
        assert gflops[layer, "fwd+bwd"] == pytest.approx(gflops[layer, "fwd"])  # 3x the FLOPs in 3x the time
    for variant in speed.VARIANTS:
        assert gflops[f"{variant}+compile", "fwd"] == gflops[variant, "fwd"]
    assert gflops["conba-full", "fwd"] > gflops["conba-ssd", "fwd"]
    assert [args[3] for args in trained] == [200.0, 200.0]  # eager and compiled steps
    # memory() said: 1 byte saved, a peak of 2
    assert all((r["peak_MiB"], r["saved_MiB"]) == (2 / 2**20, 1 / 2**20 if r["mode"] == "fwd+bwd" else None)
               for r in layer_rows)
    assert json.loads((tmp_path / "speed.json").read_text())["train_matmul_peak_gflops"] == 200.0


def test_train_step_row_counts_the_steps_forward_and_backward_flops_over_its_median(monkeypatch):
    """With the step timed at 0.5 s and a peak of 1 MiB: tokens/s of the batch, and the FLOPs that torch's counter
    sees in a forward and backward of the `small` preset, over the time and the peak given."""
    monkeypatch.setattr(speed, "median_seconds", lambda fn, repeats, warmup: 0.5)
    monkeypatch.setattr(speed, "peak_memory", lambda fn, device: 2**20)
    row = speed.train_step_row(2, 16, 1, 100.0, "cpu", torch.float32)
    model = MixConForCausalLM(MixConConfig.preset("small"))
    ids = torch.randint(0, 100, (2, 17))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
    gflops = counter.get_total_flops() / 0.5 / 1e9
    assert (row["tokens_per_s"], row["ms"], row["peak_MiB"]) == (2 * 16 / 0.5, 500.0, 1.0)
    assert (row["gflops"], row["peak_frac"]) == pytest.approx((gflops, gflops / 100.0))


def test_ratios_are_each_conba_variants_throughput_over_transformers_mamba2s(capsys):
    rows = [dict(layer="transformers-mamba2", T=64, B=1, mode="fwd", tokens_per_s=100.0),
            dict(layer="conba-ssd", T=64, B=1, mode="fwd", tokens_per_s=250.0),
            dict(layer="conba-ssd", T=64, B=1, mode="fwd+bwd", tokens_per_s=50.0)]  # no Mamba2 row to compare
    speed._ratios(rows)
    assert capsys.readouterr().out.split() == ["conba-ssd", "T=", "64", "B=1", "fwd", "2.50x", "transformers-mamba2"]


def test_speed_memory_runs_the_backward_and_counts_what_autograd_saves(monkeypatch):
    """A fwd+bwd call's peak is that of forward and backward (to the input too); its saved bytes leave out the input
    and weights."""
    monkeypatch.setattr(speed, "peak_memory", lambda fn, device: fn() or 7)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
    inputs = []
    module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].requires_grad))
    u = torch.randn(2, 5, 8)
    assert speed.memory(module, u, False) == (0, 7) and module[0].weight.grad is None and inputs == [False]
    assert speed.memory(module, u, True) == (2 * 5 * 16 * 4, 7)  # tanh's output, saved for its backward
    assert module[0].weight.grad is not None and inputs == [False, True, True]  # timed, then counted


def test_speed_plot_draws_every_batch_size(tmp_path, monkeypatch):
    """A line per layer and batch size, in each mode's axes (only batch 1 was drawn: `--batches 4` gave empty axes)."""
    drawn = {}
    monkeypatch.setattr(speed, "save_figure", lambda fig, path: drawn.update(
        {ax.get_title(): sorted(line.get_label() for line in ax.get_lines()) for ax in fig.axes}))
    rows = [dict(layer=layer, mode=mode, B=B, T=T, tokens_per_s=1e3 * B + T)
            for layer in ("conba-ssd", "transformers-mamba2") for mode in ("fwd", "fwd+bwd") for B in (2, 4)
            for T in (64, 128)]
    speed._plot(rows, tmp_path / "speed.png")
    labels = sorted(f"{layer} B={B}" for layer in ("conba-ssd", "transformers-mamba2") for B in (2, 4))
    assert drawn == {"fwd": labels, "fwd+bwd": labels}


@pytest.fixture
def narrow_layers(monkeypatch):
    """Narrower layers than the issue's (what a test checks does not depend on the width)."""
    monkeypatch.setattr(speed, "layer_config", lambda: MixConConfig.preset(
        "small", d_model=32, conba_head_dim=16, conba_state=16, conba_chunk=32))


@pytest.mark.parametrize("fails_from_call", [1, 2, 4], ids=["warm-up", "first-round", "memory-pass"])
def test_speed_benchmark_records_a_layer_out_of_memory_and_times_the_rest(monkeypatch, narrow_layers,
                                                                          fails_from_call):
    calls = []

    def no_room(self, u, *args, **kwargs):
        calls.append(1)
        if len(calls) >= fails_from_call:
            raise torch.OutOfMemoryError("no room")
        return Conba.forward(self, u, *args, **kwargs)
    monkeypatch.setattr(speed, "reference_layer", lambda config: type("Big", (Conba,), {"forward": no_room})(
        config, 0))
    rows = speed.run([32], [1], repeats=1, reference_max_T=32, out_dir=None, train_shape=None, triton=False)
    oom = [r for r in rows if r["layer"] == "reference-loop"]
    assert [r["mode"] for r in oom] == ["fwd", "fwd+bwd"]
    assert all(r["note"] == "out of memory" and r["tokens_per_s"] is None for r in oom)
    assert all(r["tokens_per_s"] > 0 for r in rows if r["layer"] != "reference-loop")
    # rows layer by layer, in the benchmark's order, fwd before fwd+bwd
    assert [(r["layer"], r["mode"]) for r in rows[:4]] == [("transformers-mamba2", "fwd"),
                                                          ("transformers-mamba2", "fwd+bwd"),
                                                          ("conba-ssd", "fwd"), ("conba-ssd", "fwd+bwd")]


def test_speed_benchmark_times_the_triton_kernel_forward(narrow_layers):
    pytest.importorskip("triton", reason="triton is not installed")  # on a CPU: its interpreter (conftest.py)
    # (narrow layers: the interpreter runs the kernel's products in Python, ~100 s at full width)
    rows = speed.run([64], [1], repeats=1, reference_max_T=0, out_dir=None, train_shape=None, triton=True)
    triton_rows = [r for r in rows if r["layer"].endswith("+triton")]
    assert {r["layer"] for r in triton_rows} == {f"{name}+triton" for name in speed.VARIANTS}
    assert all(r["mode"] == "fwd" and r["tokens_per_s"] > 0 for r in triton_rows)


@pytest.mark.parametrize("T", [100, 20])  # 4 chunks of 32, or one of 20 (the scan's chunk is T when shorter)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("variant", list(speed.VARIANTS))
def test_layer_flops_equal_torchs_flop_counter(variant, groups, T):
    """The count from the shapes against torch's FlopCounterMode on the layer itself (which does not see the
    delta rule's triangular solve: C³ per head and chunk, added here)."""
    config = speed.layer_config().replace(**speed.VARIANTS[variant], conba_groups=groups, conba_chunk=32)
    layer, B = Conba(config, 0), 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(torch.randn(B, T, config.d_model))
    C = min(32, T)
    solve = B * -(-T // C) * config.conba_heads * C**3 if config.conba_control else 0
    assert speed.layer_flops(layer, config, B, T, backward=False) == pytest.approx(
        counter.get_total_flops() + solve, rel=1e-9)
    assert speed.layer_flops(layer, config, B, T, backward=True) == 3 * speed.layer_flops(layer, config, B, T, False)
    compiled = torch.compile(layer)  # (an OptimizedModule wrapping the layer: compiled on its first call)
    assert speed.layer_flops(compiled, config, B, T, False) == speed.layer_flops(layer, config, B, T, False)


@pytest.mark.parametrize("T,tau", [(3, 5), (4, 2), (40, 3)])  # fewer steps than tau, and more
@pytest.mark.parametrize("delta_rule", [False, True])
def test_scan_flops_equal_torchs_flop_counter(T, tau, delta_rule):
    """The scan alone, its early readout of the initial past states included (min(tau, T) steps). (At T = 1 the
    einsums contract dimensions of one, which torch runs as products the counter does not see.)"""
    B, H, P, N, G = 2, 4, 8, 6, 2
    g = torch.Generator().manual_seed(0)
    x, k, q = (torch.randn(B, T, *shape, generator=g) for shape in ((H, P), (G, N), (G, N)))
    log_decay, beta = -torch.rand(B, T, H, generator=g), torch.rand(B, T, H, generator=g)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        conba_scan(x, k, q, log_decay, beta, delta_rule=delta_rule, tau=tau, delay_gain=torch.ones(H), chunk_size=32)
    C = min(32, T)
    solve = B * -(-T // C) * H * C**3 if delta_rule else 0
    assert speed.scan_flops(B, T, H, P, N, 32, delta_rule, tau, G=G) == counter.get_total_flops() + solve


@pytest.mark.parametrize("T", [300, 50])  # 5 chunks of 64, the last padded; one chunk padded from 50
def test_mamba2_flops_equal_torchs_flop_counter(T):
    """Exactly what the counter sees but the depthwise conv, which the count leaves out of both layers (Conba's
    runs as multiply-adds that the counter does not see)."""
    pytest.importorskip("transformers", reason="transformers not installed")
    config = speed.layer_config().replace(**speed.SSD)
    mixer = speed.mamba2_mixer(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mixer(torch.randn(2, T, config.d_model))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.convolution"] > 0
    seen = counter.get_total_flops() - counts["aten.convolution"]
    assert speed.layer_flops(mixer, config, 2, T, backward=False) == seen


def test_a_layers_saved_bytes_leave_out_its_input_and_weights():
    """What a backward keeps beyond the tensors that exist anyway: a linear layer keeps only those (its input and
    weight); a SiLU after it keeps its own input too."""
    u = torch.randn(4, 16, 8)
    linear = torch.nn.Linear(8, 8, bias=False)
    assert speed.memory(linear, u, backward=True)[0] == 0
    assert speed.memory(torch.nn.Sequential(linear, torch.nn.SiLU()), u, backward=True)[0] == 4 * 16 * 8 * 4


def test_speed_command_hands_its_options_to_the_benchmark(tmp_path, monkeypatch):
    given = []
    monkeypatch.setattr(speed, "run", lambda *args, **kwargs: given.append((args, kwargs)))
    argv = ["bench", "speed", "--lengths", "8,16", "--batches", "1", "--repeats", "2", "--reference-max-T", "8",
            "--out", str(tmp_path), "--dtype", "bf16", "--device", "cpu"]
    assert main([*argv, "--compile", "--train-step", "2x16"]) == 0
    assert main([*argv, "--train-step", ""]) == 0
    assert given == [(([8, 16], [1], 2, 8, tmp_path), dict(device="cpu", dtype=torch.bfloat16, compiled=compiled,
                                                          train_shape=shape))
                     for compiled, shape in [(True, (2, 16)), (False, None)]]
