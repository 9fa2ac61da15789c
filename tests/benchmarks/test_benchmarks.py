"""The benchmark scripts run end to end at toy sizes and report what they claim to."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mixcon
from mixcon.benchmarks import common, decode, matvec, scan, speed
from mixcon.benchmarks.common import SavedBytes
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
    """With every layer timed at 10 ms: a fwd+bwd row counts 3x its forward's FLOPs, a compiled variant's row the
    FLOPs of its own variant (not the SSD layer's), and the training step's peak is the better of two measurements."""
    monkeypatch.setattr(speed, "interleaved_median_seconds", lambda fns, *a, **k: dict.fromkeys(fns, 0.01))
    monkeypatch.setattr(speed, "memory", lambda module, u, backward: (1, 2))
    peaks = iter([100.0, 200.0])
    monkeypatch.setattr(speed, "matmul_peak_gflops", lambda **kwargs: next(peaks))
    trained = []
    monkeypatch.setattr(speed, "train_step_row", lambda *args: trained.append(args) or dict(
        layer="small train step", T=16, B=2, mode="train", tokens_per_s=1.0, gflops=50.0, peak_frac=50.0 / args[3]))
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    rows = speed.run([32], [1], repeats=1, reference_max_T=0, out_dir=tmp_path, compiled=True, train_shape=(2, 16),
                     triton=False)
    gflops = {(r["layer"], r["mode"]): r["gflops"] for r in rows}
    for layer in ("transformers-mamba2", *speed.VARIANTS):
        assert gflops[layer, "fwd+bwd"] == pytest.approx(3 * gflops[layer, "fwd"])
    for variant in speed.VARIANTS:
        assert gflops[f"{variant}+compile", "fwd"] == gflops[variant, "fwd"]
    assert gflops["conba-full", "fwd"] > gflops["conba-ssd", "fwd"]
    assert [args[3] for args in trained] == [200.0, 200.0]  # eager and compiled steps
    layer_rows = [r for r in rows if r["mode"] != "train"]  # memory() said: 1 byte saved, a peak of 2
    assert all((r["peak_MiB"], r["saved_MiB"]) == (2 / 2**20, 1 / 2**20 if r["mode"] == "fwd+bwd" else None)
               for r in layer_rows)
    assert json.loads((tmp_path / "speed.json").read_text())["train_matmul_peak_gflops"] == 200.0


def test_speed_memory_runs_the_backward_and_counts_what_autograd_saves(monkeypatch):
    """A fwd+bwd call's peak is that of forward and backward; its saved bytes leave out the input and weights."""
    monkeypatch.setattr(speed, "peak_memory", lambda fn, device: fn() or 7)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
    u = torch.randn(2, 5, 8)
    assert speed.memory(module, u, False) == (0, 7) and module[0].weight.grad is None
    assert speed.memory(module, u, True) == (2 * 5 * 16 * 4, 7)  # tanh's output, saved for its backward
    assert module[0].weight.grad is not None


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


def test_interleaved_timing_alternates_the_order_of_each_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = common.interleaved_median_seconds(fns, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert set(medians) == set("abc") and all(m >= 0 for m in medians.values())


def test_interleaved_timing_leaves_out_what_raises_the_errors_it_is_told():
    calls = []

    def b():
        calls.append("b")
        if calls.count("b") == 2:  # its warm-up passes, its first timed call fails
            raise torch.OutOfMemoryError("no room")
    medians = common.interleaved_median_seconds({"a": lambda: calls.append("a"), "b": b}, repeats=3, warmup=1,
                                                dropped_on=(torch.OutOfMemoryError,))
    assert set(medians) == {"a"} and calls == ["a", "b", "a", "b", "a", "a"]
    with pytest.raises(ValueError):  # anything else propagates
        common.interleaved_median_seconds({"c": lambda: int("c")}, dropped_on=(torch.OutOfMemoryError,))


@pytest.mark.parametrize("fails_from_call", [1, 2, 4], ids=["warm-up", "first-round", "memory-pass"])
def test_speed_benchmark_records_a_layer_out_of_memory_and_times_the_rest(monkeypatch, fails_from_call):
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


def test_speed_benchmark_times_the_triton_kernel_forward(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")  # on a CPU: its interpreter (conftest.py)
    rows = speed.run([64], [1], repeats=1, reference_max_T=0, out_dir=None, train_shape=None, triton=True)
    triton_rows = [r for r in rows if r["layer"].endswith("+triton")]
    assert {r["layer"] for r in triton_rows} == {f"{name}+triton" for name in speed.VARIANTS}
    assert all(r["mode"] == "fwd" and r["tokens_per_s"] > 0 for r in triton_rows)


SCAN_SHAPE = dict(heads=4, head_dim=8, state=8, groups=2)


def test_scan_benchmark_rows_against_the_roofline(tmp_path):
    rows = scan.run([40], [2], repeats=1, out_dir=tmp_path, chunks=(16, 32), triton=False, **SCAN_SHAPE)
    assert [(r["variant"], r["form"]) for r in rows] == [(v, f"torch c{c}") for v in scan.VARIANTS for c in (16, 32)]
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["gbs"] > 0 and r["x_roofline"] > 0 for r in rows)
    # the forms compute one function: each chunk length against the first
    assert all(r["max_err"] == 0 if r["form"] == "torch c16" else r["max_err"] < 1e-5 for r in rows)
    flops = speed.scan_flops(2, 40, 4, 8, 8, 32, True, 2, G=2)
    control = next(r for r in rows if (r["variant"], r["form"]) == ("control-tau2", "torch c32"))
    assert control["gflops"] == pytest.approx(flops / control["ms"] * 1e3 / 1e9)
    assert json.loads((tmp_path / "scan.json").read_text())["rows"] == rows
    assert (tmp_path / "scan.png").stat().st_size > 0


def test_scan_benchmark_times_the_triton_kernel_beside_the_torch_scan():
    """In Triton's interpreter on a CPU: the kernel's rows within its limits (chunks >= 16), equal to torch's."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'mixcon[triton]')")
    rows = scan.run([40], [1], repeats=1, out_dir=None, chunks=(8, 16), variants=("control-tau2",), triton=True,
                    **SCAN_SHAPE)
    assert [r["form"] for r in rows] == ["torch c8", "torch c16", "triton c16"]
    assert rows[-1]["max_err"] < 1e-4
    rows = scan.run([40], [1], repeats=1, out_dir=None, chunks=(16,), variants=("control-tau2",), triton=True,
                    value_blocks=[64, 16, 32], **dict(SCAN_SHAPE, head_dim=24))  # 64 is 32 at P = 24: once
    assert [r["form"] for r in rows] == ["torch c16", "triton c16 v16", "triton c16 v32"]
    assert all(r["max_err"] < 1e-4 for r in rows)


def test_scan_benchmark_compiled_form(have_c_compiler):
    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C compiler")
    rows = scan.run([24], [1], repeats=1, out_dir=None, chunks=(8,), variants=("ssd-tau2",), compiled=True,
                    triton=False, **SCAN_SHAPE)
    assert [r["form"] for r in rows] == ["torch c8", "torch+compile c8"]
    assert rows[-1]["max_err"] < 1e-5


def test_scan_benchmark_command(tmp_path, monkeypatch):
    argv = ["bench", "scan", "--lengths", "24", "--batches", "1", "--heads", "2", "--head-dim", "4", "--state", "4",
            "--groups", "2", "--chunks", "8", "--variants", "ssd,control", "--repeats", "1", "--device", "cpu",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/mixcon", *argv])  # as the command line would run it
    assert main(argv) == 0
    result = json.loads((tmp_path / "scan.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["ssd", "control"]
    assert (result["heads"], result["head_dim"], result["state"], result["groups"]) == (2, 4, 4, 2)
    assert result["machine"]["argv"] == ["mixcon", *argv]  # the result says what produced it, and with what
    assert result["machine"]["mixcon"].startswith(mixcon.__version__)
    assert result["machine"]["transformers"] == importlib.metadata.version("transformers")
    assert result["machine"]["python"] == platform.python_version() and result["machine"]["cpu"]
    assert result["machine"]["fp32_matmul_precision"] == torch.get_float32_matmul_precision() == "highest"
    try:
        assert main([*argv, "--fp32-precision", "high"]) == 0
        assert json.loads((tmp_path / "scan.json").read_text())["machine"]["fp32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    with pytest.raises(SystemExit, match="--variants bogus unknown"):
        main([*argv[:-2], "--variants", "bogus"])
    with pytest.raises(SystemExit, match="multiple of --groups"):
        main([*argv, "--groups", "3"])
    with pytest.raises(SystemExit, match=r"--value-blocks \[24\] must be powers of two >= 16"):
        main([*argv, "--value-blocks", "16,24"])
    with pytest.raises(SystemExit, match="--value-blocks times the Triton kernel, which runs here only on CUDA"):
        main([*argv, "--value-blocks", "16"])


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


def test_the_matmul_peak_and_the_copy_bandwidth_from_their_timings(monkeypatch):
    """The peak from the fastest of the repeats (2 n^3 FLOP each); a copy moves its bytes twice (read, write)."""
    monkeypatch.setattr(common, "wall_times", lambda fn, repeats, warmup: [0.5, 0.25, 0.4])
    assert common.matmul_peak_gflops(n=64) == pytest.approx(2 * 64**3 / 0.25 / 1e9)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats, warmup: 0.5)
    assert common.copy_bandwidth_gbs(mbytes=1) == pytest.approx(2 * 2**20 / 0.5 / 1e9)
    assert common.stream_read_gbs(mbytes=1) == pytest.approx(2**20 / 0.5 / 1e9)  # a sum reads its bytes once


def test_tensor_bytes_counts_each_storage_once():
    x = torch.zeros(10)
    assert decode.tensor_bytes([x, x[1:], {"a": (x.view(2, 5),)}, torch.ones(3, dtype=torch.float64)]) == 40 + 24


def test_decode_benchmark_reports_cache_from_the_cache(tmp_path):
    base = MixConConfig.preset("small", d_model=64, vocab_size=512, n_blocks=1, n_experts=4, mlp_hidden=128,
                               conba_head_dim=16, conba_state=16)
    rows = decode.run([16], hf_max_context=16, new_tokens=2, repeats=1, out_dir=tmp_path, base=base)
    assert {r["model"] for r in rows} == {"mixcon", "transformer-twin", "conba-twin", "transformers-jamba",
                                           "transformers-llama"}
    ours = next(r for r in rows if r["model"] == "mixcon")
    assert ours["cache_MiB"] > 0 and ours["decode_ms"] > 0 and ours["prefill_tok_s"] > 0
    assert ours["bound_ms"] > 0 and ours["stream_bound_ms"] > 0
    # transformers' caches as their generate returns them: Llama's K and V of the 16 + 2 fed positions
    llama = next(r for r in rows if r["model"] == "transformers-llama")
    kv = 2 * base.n_layers * base.n_kv_heads * (16 + 2) * (base.d_model // base.n_heads) * 4
    assert llama["cache_MiB"] == kv / 2**20
    assert next(r for r in rows if r["model"] == "transformers-jamba")["cache_MiB"] > 0
    assert (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_benchmark_rows_from_timings_and_bandwidths(tmp_path, monkeypatch, dtype):
    """With the timings and bandwidths fixed: tokens/s, ms per token, and the bound, the active weights (in the
    run's dtype) plus the cache that a generation allocates read once per token at the copy's read rate (half the
    copy's traffic)."""
    from mixcon.generation.generate import generation_capacity

    base = MixConConfig.preset("small", d_model=64, vocab_size=512, n_blocks=1, n_experts=4, mlp_hidden=128,
                               conba_head_dim=16, conba_state=16)
    monkeypatch.setattr(decode, "copy_bandwidth_gbs", lambda device: 20.0)
    monkeypatch.setattr(decode, "stream_read_gbs", lambda device: 5.0)
    monkeypatch.setattr(decode, "hf_models", lambda base: {})
    monkeypatch.setattr(decode, "time_generation", lambda model, ids, n: (0.5, [0.004] * n, None))
    rows = decode.run([16], hf_max_context=16, new_tokens=2, repeats=1, out_dir=None, base=base, dtype=dtype)
    ours = next(r for r in rows if r["model"] == "mixcon")
    model = MixConForCausalLM(base).to(dtype)
    cache = model.new_cache(1, max_length=generation_capacity(16, 3)).nbytes()
    read = model.num_parameters(active=True) * dtype.itemsize + cache
    assert (ours["prefill_tok_s"], ours["decode_ms"], ours["decode_tok_s"]) == pytest.approx((32.0, 4.0, 250.0))
    assert ours["cache_MiB"] == cache / 2**20
    assert (ours["bound_ms"], ours["stream_bound_ms"]) == pytest.approx((read / 10e9 * 1e3, read / 5e9 * 1e3))


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_generation_is_timed_over_as_many_gaps_as_new_tokens(tiny_model, new_tokens):
    """One token more than asked is generated: the first ends the prefill, each later one a decoding step."""
    model = tiny_model(dtype=torch.float32)
    prefill, gaps, cache_bytes = decode.time_generation(model, torch.randint(0, 300, (1, 5)), new_tokens)
    assert prefill > 0 and len(gaps) == new_tokens and all(g > 0 for g in gaps) and cache_bytes is None


def test_an_interrupted_decode_benchmark_keeps_the_contexts_it_finished(tmp_path, monkeypatch):
    timed = decode.time_generation

    def stop_at_12(model, ids, new_tokens):
        if ids.shape[1] == 12:
            raise KeyboardInterrupt
        return timed(model, ids, new_tokens)

    monkeypatch.setattr(decode, "time_generation", stop_at_12)
    with pytest.raises(KeyboardInterrupt):
        decode.run([8, 12], hf_max_context=0, new_tokens=2, repeats=1, out_dir=tmp_path,
                   base=MixConConfig.preset("tiny"))
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["context"] for r in rows} == {8} and (tmp_path / "decode.png").is_file()
    assert not list(tmp_path.glob("*.tmp*"))  # every file written whole, then renamed


def test_decode_benchmark_command_takes_a_config(tmp_path):
    argv = ["bench", "decode", "--config", "tiny", "--set", "attn_per_block=2", "--contexts", "8",
            "--hf-max-context", "0", "--new-tokens", "2", "--repeats", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["mixcon", "transformer-twin", "conba-twin"]
    tiny = MixConForCausalLM(MixConConfig.preset("tiny", attn_per_block=2))
    assert rows[0]["cache_MiB"] == tiny.new_cache(1, max_length=8 + 3).nbytes() / 2**20  # as generate allocates


def test_decode_benchmark_command_hands_its_flags_to_the_run(tmp_path, monkeypatch, capsys):
    given = {}
    monkeypatch.setattr(decode, "run", lambda *args, **kwargs: given.update(kwargs, args=args))
    assert main(["bench", "decode", "--contexts", "8,16", "--hf-max-context", "8", "--new-tokens", "3", "--repeats",
                 "2", "--compile", "--dtype", "bf16", "--out", str(tmp_path)]) == 0
    assert given["args"] == ([8, 16], 8, 3, 2, tmp_path) and (given["compiled"], given["dtype"]) == (True,
                                                                                                  torch.bfloat16)
    assert given["cuda_graphs"] is False
    with pytest.raises(SystemExit, match=r"^mixcon bench decode: --cuda-graphs needs a CUDA --device, got cpu$"):
        main(["bench", "decode", "--device", "cpu", "--cuda-graphs", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # no benchmark named: a usage error, not the top-level help
        main(["bench"])
    assert exit_info.value.code == 2 and "the following arguments are required: BENCH" in capsys.readouterr().err


def test_decode_benchmark_times_mixcon_through_transformers_generate(tmp_path):
    pytest.importorskip("transformers", minversion="5", reason="the transformers wrapper needs transformers >= 5")
    argv = ["bench", "decode", "--config", "tiny", "--contexts", "8", "--hf-max-context", "0", "--new-tokens", "2",
            "--repeats", "1", "--via-transformers", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "decode.json").read_text())["rows"]}
    assert list(rows) == ["mixcon", "transformer-twin", "conba-twin", "mixcon via transformers"]
    wrapped, ours = rows["mixcon via transformers"], rows["mixcon"]
    assert wrapped["decode_ms"] > 0 and wrapped["prefill_tok_s"] > 0
    assert wrapped["cache_MiB"] == ours["cache_MiB"]  # room for the prompt and what generate asks, as ours


def test_decode_benchmark_times_the_triton_kernel_beside_the_torch_scan(monkeypatch):
    """`+triton` rows for the models with Conba layers, prefilling through the kernel (here in Triton's CPU
    interpreter)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'mixcon[triton]')")
    from mixcon.ops import triton_chunk

    calls = []
    kernel = triton_chunk.conba_scan_triton
    monkeypatch.setattr(triton_chunk, "conba_scan_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    base = MixConConfig.preset("tiny", conba_chunk=16)
    rows = decode.run([8], hf_max_context=0, new_tokens=2, repeats=1, out_dir=None, base=base, triton=True)
    assert [r["model"] for r in rows] == ["mixcon", "transformer-twin", "conba-twin", "mixcon+triton",
                                          "conba-twin+triton"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_ms"] > 0 for r in rows)
    n_conba = sum(m == "conba" for m, _ in base.layout()) + base.n_layers  # mixcon's layers, the twin's
    assert len(calls) == 4 * n_conba  # 2 warm-up prompts, the warm-up at the context, 1 repeat


def test_decode_benchmark_times_cuda_graphs_on_cuda_only():
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device, got device='cpu'"):
        decode.run([8], 0, 1, 1, None, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_benchmark_times_decoding_from_cuda_graphs():
    rows = decode.run([8], hf_max_context=0, new_tokens=4, repeats=1, out_dir=None, base=MixConConfig.preset("tiny"),
                      device="cuda", triton=False, cuda_graphs=True)
    assert [r["model"] for r in rows] == ["mixcon", "transformer-twin", "conba-twin", "mixcon+graphs",
                                          "transformer-twin+graphs", "conba-twin+graphs"]
    assert all(r["decode_ms"] > 0 for r in rows)


def test_recall_benchmark_trains_and_scores_the_three_twins(tmp_path):
    argv = ["bench", "recall", "--set", "d_model=16", "--pairs", "4,2", "--seq-len", "16", "--vocab", "16",
            "--steps", "2", "--batch-size", "4", "--sequences", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "recall.json").read_text())
    rows = payload["rows"]
    assert [r["model"] for r in rows] == ["mixcon", "transformer-twin", "conba-twin"]
    assert [r["layout"].count("A") for r in rows] == [2, 8, 0]
    assert [r["conba_state_floats"] for r in rows] == [2 * 16 * 8, None, 2 * 16 * 8]  # H x P x N per layer
    assert all(r["final_loss"] > 2 for r in rows)  # the mean of 2 steps' losses, near ln 16
    assert payload["pairs"] == [2, 4] and payload["task"]["vocab_size"] == 16
    assert payload["machine"]["torch"] == torch.__version__  # every result file says where it was measured
    # 6 sequences x 2 or 4 asked keys: accuracies are multiples of 1/12 or 1/24 in [0, 1]
    assert all(0 <= r["acc@2"] <= 1 and (r["acc@2"] * 12) % 1 < 1e-9 for r in rows)
    assert all(0 <= r["acc@4"] <= 1 and (r["acc@4"] * 24) % 1 < 1e-9 for r in rows)
    assert (tmp_path / "recall.png").stat().st_size > 0
    assert main([*argv, "--models", "conba-twin", "--out", str(tmp_path / "one")]) == 0
    assert [r["model"] for r in json.loads((tmp_path / "one" / "recall.json").read_text())["rows"]] == ["conba-twin"]


@pytest.mark.parametrize("argv,message", [
    (["--pairs", "2,5", "--seq-len", "16"], r"--pairs 2,5: each must be in \[1, 4\]"),
    (["--models", "mixcon,llama"], "unknown llama"),
])
def test_recall_benchmark_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):  # (--out: a run that is not refused writes there, not in docs/)
        main(["bench", "recall", "--out", str(tmp_path), *argv])


def test_twins_of_a_model_with_a_layer_pattern_are_pure():
    base = MixConConfig.preset("tiny", layer_pattern="ACCC", conba_per_block=3)
    assert {name: c.layout_string() for name, c in common.twins(base).items()} == {
        "mixcon": "ACCC/DMDM | ACCC/DMDM", "transformer-twin": "AAAA/DMDM | AAAA/DMDM",
        "conba-twin": "CCCC/DMDM | CCCC/DMDM"}


def test_timings_are_medians_and_memory_is_counted_in_kib_of_1024_bytes(monkeypatch):
    times = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(common, "seconds_of", lambda fn: next(times))
    assert common.interleaved_median_seconds({"a": lambda: None}, repeats=3, warmup=0) == {"a": 2.0}
    if not sys.platform.startswith("linux"):
        pytest.skip("peak_memory reads /proc/self/status (Linux)")
    monkeypatch.setattr(common, "_status_kib", lambda key: {"VmRSS": 100, "VmHWM": 150}[key])
    assert common.peak_memory(lambda: None, "cpu") == 50 * 1024


def test_resume_refuses_results_written_without_a_setting(tmp_path):
    """A results file that lacks one of the settings (an older version's, or another benchmark's) is not taken as
    written with them."""
    (tmp_path / "probe.json").write_text(json.dumps({"steps": 4, "rows": []}))
    assert common.finished_runs(tmp_path, "probe", {"steps": 4}, key=("model",)) == {}
    with pytest.raises(common.UsageError, match=r"was written with other seed"):
        common.finished_runs(tmp_path, "probe", {"steps": 4, "seed": 0}, key=("model",))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory_is_what_a_call_holds_at_most_above_before():
    held = torch.ones(16 * 2**18)  # 16 MiB in use before: not counted

    def transient(mib: int) -> None:
        a = torch.ones(mib * 2**18)  # touched: resident
        b = torch.ones(mib * 2**18)
        del a, b

    peak = common.peak_memory(lambda: transient(32), "cpu")
    assert 60 * 2**20 <= peak <= 72 * 2**20  # both 32 MiB tensors at once, nothing of `held`
    assert common.peak_memory(lambda: None, "cpu") < 4 * 2**20
    assert held.sum() > 0


def test_a_layers_saved_bytes_leave_out_its_input_and_weights():
    """What a backward keeps beyond the tensors that exist anyway: a linear layer keeps only those (its input and
    weight); a SiLU after it keeps its own input too."""
    u = torch.randn(4, 16, 8)
    linear = torch.nn.Linear(8, 8, bias=False)
    assert speed.memory(linear, u, backward=True)[0] == 0
    assert speed.memory(torch.nn.Sequential(linear, torch.nn.SiLU()), u, backward=True)[0] == 4 * 16 * 8 * 4


def test_saved_bytes_counter_frees_what_it_counted():
    """Counting saved activations must not keep the counted graph alive (a leak of GBs at T = 8192)."""
    x = torch.randn(100, requires_grad=True)
    with SavedBytes() as counter:
        y = x.exp()  # exp saves its own output for backward
    assert counter.nbytes == y.nbytes
    ref = weakref.ref(y)
    del y
    assert ref() is None
    w = torch.randn(100, 50, requires_grad=True)
    with SavedBytes(x, w) as counter:
        z = (x @ w).exp()  # the product saves x and w (held, not counted), exp its output (counted)
    assert counter.nbytes == z.nbytes


def test_matvec_benchmark_times_four_forms(tmp_path, have_c_compiler):
    if not have_c_compiler:
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler")
    rows = matvec.run([2], megabytes=1, repeats=1, out_dir=tmp_path)
    assert [r["rows"] for r in rows] == [2]
    assert all(rows[0][f"{form} GB/s"] > 0 for form in matvec.FORMS)
    assert "ops.linear eager GB/s" in rows[0]
    assert rows[0]["speed-up"] == rows[0]["F.linear compiled ms"] / rows[0]["ops.linear compiled ms"]
    assert (tmp_path / "matvec.png").stat().st_size > 0


def test_kernel_report_compiles_the_triton_kernel_for_a_gpu(tmp_path):
    """The real compiler (not the interpreter the other Triton tests use on a CPU) takes the kernel to
    sm_90 machine code, fp32 and bf16, and ptxas's figures come back."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this triton has no NVIDIA backend")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip("mixcon bench kernel needs Triton >= 3.3")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile afresh
    done = subprocess.run([sys.executable, "-m", "mixcon", "bench", "kernel", "--arch", "90", "--dtypes", "fp32,bf16",
                           "--blocks", "32", "--value-blocks", "16,64", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel.json").read_text())["rows"]
    assert [(r["arch"], r["dtype"], r["block"], r["value_block"], r["precision"]) for r in rows] == \
        [("sm_90", "fp32", 32, 16, "ieee"), ("sm_90", "fp32", 32, 64, "ieee"),
         ("sm_90", "bf16", 32, 16, "tf32"), ("sm_90", "bf16", 32, 64, "tf32")]
    assert all(0 < r["registers"] <= 255 and r["spill_stores"] >= 0 and r["shared_KiB"] > 0 for r in rows)


def test_kernel_report_names_the_triton_it_needs(monkeypatch):
    """Triton 3.2 and before have no `get_ptxas`: a clear refusal, not an ImportError from Triton's internals."""
    import types

    from mixcon.benchmarks import kernel

    pytest.importorskip("triton.backends.compiler", reason="triton is not installed")
    monkeypatch.setitem(sys.modules, "triton.backends.nvidia.compiler", types.ModuleType("as in Triton 3.2"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.3 \(found 3\."):
        kernel.compile_kernel(90, torch.bfloat16, 32)


@pytest.mark.parametrize("argv,message", [
    (["--blocks", "24"], "powers of two"),
    (["--blocks", "16", "--tau", "20"], ">= --tau"),
    (["--dtypes", "fp8"], "unknown"),
    (["--value-blocks", "8"], "--value-blocks: \\[8\\] must be powers of two"),
])
def test_kernel_report_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "kernel", *argv])


def test_filler_benchmark_trains_and_scores_each_twin_at_each_ratio(tmp_path):
    corpus = tmp_path / "text.txt"
    text = "the king said to the queen that we shall go now\n" * 40
    corpus.write_text(text)
    argv = ["bench", "filler", "--set", "d_model=16", "--corpus", str(corpus), "--ratios", "1.5,0", "--real-len", "8",
            "--steps", "2", "--batch-size", "3", "--eval-windows", "5", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "out" / "filler.json").read_text())
    rows = payload["rows"]
    assert [(r["model"], r["ratio"], r["seq_len"]) for r in rows] == [
        (name, ratio, length) for ratio, length in ((0.0, 8), (1.5, 20))
        for name in ("mixcon", "transformer-twin", "conba-twin")]
    assert all(6 < r["bits_per_byte"] < 10 for r in rows)  # barely trained: near a uniform guess, log2(259) = 8.0
    assert payload["bytes"] == len(text) + 1  # every byte and one EOS
    assert (tmp_path / "out" / "filler.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--ratios", "1,-2"], "each must be a finite number >= 0"),
    (["--ratios", "inf"], "--ratios inf: each must be a finite number >= 0"),
    (["--ratios", "nan"], "--ratios nan: each must be a finite number >= 0"),
    (["--ratios", "one"], "comma-separated numbers"),
    (["--models", "llama"], "unknown llama"),
    (["--max-bytes", "1000", "--eval-windows", "64"], "needs at least 8,192"),
])
def test_filler_benchmark_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):  # (--out: a run that is not refused writes there, not in docs/)
        main(["bench", "filler", "--steps", "1", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("bench", ["filler", "recall"])
def test_filler_and_recall_benchmarks_resume_an_interrupted_run_exactly(bench, tmp_path, monkeypatch):
    from mixcon.benchmarks import bytes_lm, recall

    if bench == "filler":
        corpus = tmp_path / "text.txt"
        corpus.write_text("the king said to the queen that we shall go now\n" * 40)
        argv = ["bench", "filler", "--set", "d_model=16", "--corpus", str(corpus), "--ratios", "0,1",
                "--real-len", "8", "--steps", "2", "--batch-size", "3", "--eval-windows", "5"]
        module, trainer, runs = bytes_lm, "train_and_score", 6  # 3 twins x 2 ratios
    else:
        argv = ["bench", "recall", "--set", "d_model=16", "--pairs", "2,4", "--seq-len", "16", "--vocab", "16",
                "--steps", "2", "--batch-size", "4", "--sequences", "6"]
        module, trainer, runs = recall, "train_on_recall", 3  # 3 twins
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / f"{bench}.json").read_text())

    trained, interrupt = [], True
    train = getattr(module, trainer)

    def counted(*args, **kwargs):  # and, while `interrupt`, Ctrl-C in the last but one run
        if interrupt and len(trained) == runs - 2:
            raise KeyboardInterrupt
        trained.append(kwargs["seed"])
        return train(*args, **kwargs)

    monkeypatch.setattr(module, trainer, counted)
    out = ["--out", str(tmp_path / "cut")]
    assert main([*argv, *out]) == 130  # Ctrl-C: the command stops quietly
    def timeless(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "train_s"} for r in rows]

    partial = json.loads((tmp_path / "cut" / f"{bench}.json").read_text())
    assert timeless(partial["rows"]) == timeless(whole["rows"][:runs - 2])
    assert not (tmp_path / "cut" / f"{bench}.png").exists()

    with pytest.raises(SystemExit, match=rf"mixcon bench {bench}: --resume: .* was written with other steps"):
        main([*argv, *out, "--resume", "--steps", "3"])
    trained, interrupt = [], False
    assert main([*argv, *out, "--resume"]) == 0
    assert len(trained) == 2  # only the runs the interruption left
    resumed = json.loads((tmp_path / "cut" / f"{bench}.json").read_text())
    assert timeless(resumed["rows"]) == timeless(whole["rows"])
    assert (tmp_path / "cut" / f"{bench}.png").stat().st_size > 0
    trained = []  # fewer models than the saved run: theirs are reused, nothing trains, and none is dropped
    assert main([*argv, *out, "--resume", "--models", "conba-twin,mixcon"]) == 0 and trained == []
    kept = json.loads((tmp_path / "cut" / f"{bench}.json").read_text())["rows"]
    assert sorted(timeless(kept), key=repr) == sorted(timeless(whole["rows"]), key=repr)


def test_ablate_benchmark_pairs_variants_by_seed(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("the king said to the queen that we shall go now\n" * 40)
    argv = ["bench", "ablate", "--set", "d_model=16", "--corpus", str(corpus), "--real-len", "8", "--steps", "2",
            "--batch-size", "3", "--eval-windows", "5", "--seeds", "3,4", "--variant", "no-control",
            "--variant", "again:conba_control=false", "--variant", "pure:attn_per_block=0,conba_delay=1",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "out" / "ablate.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in payload["runs"]}
    assert list(runs) == [(v, s) for s in (3, 4) for v in ("base", "no-control", "again", "pure")]
    assert payload["variants"]["pure"] == {"attn_per_block": 0, "conba_delay": 1}
    assert runs["pure", 3]["layout"] == "CCCC/DMDM | CCCC/DMDM" and runs["base", 3]["layout"] == "CCAC/DMDM | CCAC/DMDM"
    for seed in (3, 4):  # a built-in and the same change spelled out: the same runs
        assert runs["no-control", seed]["bits_per_byte"] == runs["again", seed]["bits_per_byte"]
    assert runs["base", 3]["bits_per_byte"] != runs["base", 4]["bits_per_byte"]
    assert runs["base", 3]["bits_per_byte"] != runs["no-control", 3]["bits_per_byte"]
    assert all(6 < r["bits_per_byte"] < 10 for r in runs.values())  # barely trained: near log2(259) = 8.0
    rows = {r["variant"]: r for r in payload["rows"]}
    for name, row in rows.items():
        bits = [runs[name, s]["bits_per_byte"] for s in (3, 4)]
        deltas = [runs[name, s]["bits_per_byte"] - runs["base", s]["bits_per_byte"] for s in (3, 4)]
        assert row["seeds"] == 2 and row["bits_per_byte"] == pytest.approx(sum(bits) / 2)
        assert row["std"] == pytest.approx(abs(bits[0] - bits[1]) / 2**0.5)
        assert row["delta"] == pytest.approx(sum(deltas) / 2)
        assert row["delta_std"] == pytest.approx(abs(deltas[0] - deltas[1]) / 2**0.5)
    assert rows["base"]["delta"] == 0 and rows["base"]["delta_std"] == 0
    assert rows["pure"]["params"] > rows["base"]["params"] > rows["base"]["active_params"]
    assert (tmp_path / "out" / "ablate.png").stat().st_size > 0


def test_ablate_benchmark_runs_the_builtins_that_change_the_model():
    from mixcon.benchmarks import ablate

    tiny = MixConConfig.preset("tiny")
    builtin = ablate.builtin_variants(tiny)
    assert all(f"\n  {name} " in ablate.__doc__ for name in builtin)  # the --help lists every built-in
    changing = [name for name, fields in builtin.items() if ablate.changes_model(tiny, tiny.replace(**fields))]
    assert changing == [name for name in builtin if name != "no-noise"]  # tiny trains without noise
    noisy = tiny.replace(conba_process_noise=0.1, conba_observation_noise=0.05, moe_pattern="DMMD")
    builtin = ablate.builtin_variants(noisy)
    assert all(ablate.changes_model(noisy, noisy.replace(**fields)) for fields in builtin.values())
    mamba2 = noisy.replace(**builtin["mamba2-mixer"])  # every Conba extra off: DESIGN §2's Mamba-2 mixer
    assert (mamba2.conba_control, mamba2.conba_delay, mamba2.conba_selective, mamba2.conba_state_scaling,
            mamba2.conba_process_noise, mamba2.conba_observation_noise) == (False, 0, "linear", False, 0.0, 0.0)
    assert {f for _, f in noisy.replace(**builtin["dense-ffn"]).layout()} == {"mlp"}  # a moe_pattern too
    transformer = tiny.replace(attn_per_block=4)
    assert [n for n, f in builtin.items() if ablate.changes_model(transformer, transformer.replace(**f))] == [
        "dense-ffn", "conba-twin"]  # its Conba switches and its own layout change nothing
    with pytest.raises(ValueError, match="changes nothing in the model"):
        ablate.variant_configs(transformer, {"no-delay": {"conba_delay": 0}})
    assert ablate.changes_model(transformer, transformer.replace(conba_delay=0, d_model=48))  # one real change


@pytest.mark.parametrize("argv,message", [
    (["--variant", "no-such"], "not a built-in variant"),
    (["--variant", "base:d_model=8"], "needs a name other than 'base'"),
    (["--variant", ":d_model=48"], "needs a name other than 'base'"),
    (["--variant", "w:widht=3"], "unknown config field 'widht'"),
    (["--variant", "w:d_model"], "expected KEY=VALUE"),
    (["--variant", "h:n_heads=3"], r"--variant h: MixConConfig\.n_kv_heads=2 is invalid"),
    (["--variant", "same:d_model=32"], "changes nothing"),
    (["--variant", "no-delay", "--variant", "no-delay"], "each name once"),
    (["--seeds", "1,1"], "each seed once"),
])
def test_ablate_benchmark_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):  # (--out: a run that is not refused writes there, not in docs/)
        main(["bench", "ablate", "--steps", "1", "--out", str(tmp_path), *argv])


def test_ablate_benchmark_resumes_an_interrupted_sweep_exactly(tmp_path, monkeypatch):
    from mixcon.benchmarks import bytes_lm

    corpus = tmp_path / "text.txt"
    corpus.write_text("the king said to the queen that we shall go now\n" * 40)
    argv = ["bench", "ablate", "--set", "d_model=16", "--corpus", str(corpus), "--real-len", "8", "--steps", "2",
            "--batch-size", "3", "--eval-windows", "5", "--variant", "no-control", "--variant", "dense-ffn"]
    assert main([*argv, "--seeds", "0,1", "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "ablate.json").read_text())

    trained, interrupt = [], True
    train_and_score = bytes_lm.train_and_score

    def counted(config, *args, **kwargs):  # and, while `interrupt`, Ctrl-C in the fifth run
        if interrupt and len(trained) == 4:
            raise KeyboardInterrupt
        trained.append(kwargs["seed"])
        return train_and_score(config, *args, **kwargs)

    monkeypatch.setattr(bytes_lm, "train_and_score", counted)
    out = ["--out", str(tmp_path / "cut")]
    assert main([*argv, "--seeds", "0,1", *out]) == 130  # Ctrl-C: the command stops quietly
    partial = json.loads((tmp_path / "cut" / "ablate.json").read_text())
    assert [(r["variant"], r["seed"]) for r in partial["runs"]] == [
        ("base", 0), ("no-control", 0), ("dense-ffn", 0), ("base", 1)]
    assert not (tmp_path / "cut" / "ablate.png").exists()

    with pytest.raises(SystemExit, match=r"--resume: .* was written with other steps"):
        main([*argv, "--seeds", "0,1", *out, "--resume", "--steps", "3"])
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("king", "kong"))  # as many bytes, other text
    with pytest.raises(SystemExit, match=r"--resume: .* was written with other corpus_sha256"):
        main([*argv[:5], str(other), *argv[6:], "--seeds", "0,1", *out, "--resume"])
    trained, interrupt = [], False
    assert main([*argv, "--seeds", "0,1", *out, "--resume"]) == 0
    assert trained == [1, 1]  # only the two runs the interruption left
    resumed = json.loads((tmp_path / "cut" / "ablate.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "train_s"} for r in whole["runs"]]
    assert [{k: v for k, v in r.items() if k != "train_s"} for r in resumed["runs"]] == strip
    assert (tmp_path / "cut" / "ablate.png").stat().st_size > 0
    trained = []  # one of the seeds again: reused, and the other seed's runs stay in the results
    assert main([*argv, "--seeds", "1", *out, "--resume"]) == 0 and trained == []
    again = json.loads((tmp_path / "cut" / "ablate.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in again["runs"]) == sorted((r["variant"], r["seed"])
                                                                           for r in whole["runs"])
    assert again["seeds"] == [0, 1] and again["rows"] == resumed["rows"]


@pytest.mark.parametrize("argv,flag,allowed", [
    (["speed", "--lengths", "abc"], "--lengths", "comma-separated integers >= 1"),
    (["speed", "--lengths", "512,0"], "--lengths", "comma-separated integers >= 1"),
    (["speed", "--batches", "0"], "--batches", "comma-separated integers >= 1"),
    (["speed", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["speed", "--reference-max-T", "-1"], "--reference-max-T", "an integer >= 0"),
    (["speed", "--train-step", "0x512"], "--train-step", "BxT of integers >= 1"),
    (["scan", "--lengths", "2k"], "--lengths", "comma-separated integers >= 1"),
    (["scan", "--batches", "0"], "--batches", "comma-separated integers >= 1"),
    (["scan", "--chunks", "0"], "--chunks", "comma-separated integers >= 1"),
    (["scan", "--heads", "0"], "--heads", "an integer >= 1"),
    (["scan", "--head-dim", "0"], "--head-dim", "an integer >= 1"),
    (["scan", "--state", "0"], "--state", "an integer >= 1"),
    (["scan", "--groups", "0"], "--groups", "an integer >= 1"),
    (["scan", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["decode", "--contexts", "abc"], "--contexts", "comma-separated integers >= 1"),
    (["decode", "--contexts", "0"], "--contexts", "comma-separated integers >= 1"),
    (["decode", "--new-tokens", "0"], "--new-tokens", "an integer >= 1"),
    (["decode", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["decode", "--hf-max-context", "-1"], "--hf-max-context", "an integer >= 0"),
    (["matvec", "--rows", "abc"], "--rows", "comma-separated integers >= 1"),
    (["matvec", "--rows", "0"], "--rows", "comma-separated integers >= 1"),
    (["matvec", "--megabytes", "0"], "--megabytes", "an integer >= 1"),
    (["matvec", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["kernel", "--arch", "h100"], "--arch", "comma-separated integers >= 1"),
    (["kernel", "--arch", "80,1"], "--arch", "comma-separated compute capabilities among 75, 80, 86"),  # not a GPU's
    (["kernel", "--blocks", "x"], "--blocks", "comma-separated integers >= 1"),
    (["kernel", "--head-dim", "0"], "--head-dim", "an integer >= 1"),
    (["kernel", "--tau", "-1"], "--tau", "an integer >= 0"),
    (["recall", "--pairs", "two"], "--pairs", "comma-separated integers >= 1"),
    (["recall", "--pairs", "0,2"], "--pairs", "comma-separated integers >= 1"),
    (["recall", "--sequences", "0"], "--sequences", "an integer >= 1"),
    (["recall", "--seq-len", "0"], "--seq-len", "an integer >= 4"),  # (not blamed on --pairs)
    (["recall", "--vocab", "2"], "--vocab", "an integer >= 3"),
    (["recall", "--steps", "0"], "--steps", "an integer >= 1"),
    (["recall", "--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["recall", "--lr", "nan"], "--lr", "a finite number > 0"),
    (["filler", "--real-len", "1"], "--real-len", "an integer >= 2"),
    (["filler", "--max-bytes", "0"], "--max-bytes", "an integer >= 1"),
    (["filler", "--eval-windows", "0"], "--eval-windows", "an integer >= 1"),
    (["filler", "--lr", "0"], "--lr", "a finite number > 0"),
    (["ablate", "--seeds", "x"], "--seeds", "comma-separated integers in [0, 18446744073709551614], got 'x'"),
    (["ablate", "--seeds", "0,-1"], "--seeds", "comma-separated integers in [0, 18446744073709551614]"),
    (["ablate", "--seeds", str(2**64 - 1)], "--seeds", "comma-separated integers in [0, 18446744073709551614]"),
    (["ablate", "--real-len", "1"], "--real-len", "an integer >= 2"),
    (["ablate", "--steps", "0"], "--steps", "an integer >= 1"),
    (["recall", "--seed", "-1"], "--seed", "an integer in [0, 18446744073709551614], got '-1'"),
    (["filler", "--seed", "1.5"], "--seed", "an integer in [0, 18446744073709551614]"),
])
def test_every_benchmark_rejects_bad_sizes_and_lists_before_any_work(argv, flag, allowed, capsys):
    """A usage error naming the flag and what it allows (exit 2), from argparse: nothing runs."""
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert f"mixcon bench {argv[0]}: error: argument {flag}: expected {allowed}" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["speed", "decode", "recall", "filler", "ablate", "matvec", "scan", "kernel"])
def test_benchmark_help_says_where_results_go(bench, capsys):
    with pytest.raises(SystemExit):
        main(["bench", bench, "--help"])
    written = "docs/bench" if bench not in ("scan", "kernel") else "none, nothing written"
    assert f"(default: {written})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("bench", ["recall", "filler", "ablate"])
def test_an_error_inside_a_training_benchmark_keeps_its_traceback(bench, tmp_path, monkeypatch):
    """Only argument errors become one-line exits: a ValueError raised while running (a bug) propagates."""
    from mixcon.benchmarks import bytes_lm, recall

    def broken(*args, **kwargs):
        raise ValueError("a bug deep inside")

    module, trainer = (recall, "train_on_recall") if bench == "recall" else (bytes_lm, "train_and_score")
    monkeypatch.setattr(module, trainer, broken)
    corpus = tmp_path / "text.txt"
    corpus.write_text("the king said to the queen that we shall go now\n" * 40)
    argv = {"recall": ["--pairs", "2", "--seq-len", "16", "--vocab", "16"],
            "filler": ["--corpus", str(corpus), "--ratios", "0", "--real-len", "8", "--eval-windows", "5"],
            "ablate": ["--corpus", str(corpus), "--real-len", "8", "--eval-windows", "5", "--seeds", "0"]}[bench]
    with pytest.raises(ValueError, match="a bug deep inside"):
        main(["bench", bench, "--set", "d_model=16", "--steps", "1", *argv, "--out", str(tmp_path / "out")])


def test_resume_without_an_earlier_run_says_where_it_looked(tmp_path, monkeypatch):
    from mixcon.benchmarks import recall

    monkeypatch.setattr(recall, "train_on_recall", lambda *a, **kw: pytest.fail("trained with nothing to resume"))
    looked = re.escape(str(tmp_path))
    with pytest.raises(SystemExit, match=f"mixcon bench recall: --resume: no earlier run in {looked} "):
        main(["bench", "recall", "--set", "d_model=16", "--pairs", "2", "--seq-len", "16", "--vocab", "16",
              "--out", str(tmp_path), "--resume"])


def test_a_config_error_names_the_bench():
    with pytest.raises(SystemExit, match=r"^mixcon bench decode: --set 'nope=1': unknown config field 'nope'"):
        main(["bench", "decode", "--set", "nope=1"])


def test_recall_benchmark_scores_each_pair_count_on_held_out_seeds_with_the_tasks_vocabulary(tmp_path, monkeypatch):
    from mixcon.benchmarks import recall
    from mixcon.data.synthetic import RecallTask

    scored = []

    def accuracy(model, task, num_pairs, *, sequences, seed):
        scored.append((model.config.vocab_size, num_pairs, sequences, seed))
        return num_pairs / 100

    monkeypatch.setattr(recall, "train_on_recall", lambda *a, **kw: [1.0] * 30)
    monkeypatch.setattr(recall, "recall_accuracy", accuracy)
    task = RecallTask(vocab_size=16, seq_len=16)
    base = MixConConfig.preset("tiny", d_model=16)
    settings = dict(steps=1, batch_size=2, lr=1e-3, sequences=6, seed=7, out_dir=tmp_path)
    rows = recall.run(base, task, [2, 4], models=["mixcon"], **settings)
    assert scored == [(16, 2, 6, 8), (16, 4, 6, 8)]  # every pair count, sequences from seed + 1, vocab the task's
    assert (rows[0]["acc@2"], rows[0]["acc@4"]) == (0.02, 0.04)
    assert rows[0]["params"] == MixConForCausalLM(base.replace(vocab_size=16)).num_parameters()
    payload = json.loads((tmp_path / "recall.json").read_text())
    assert payload["task"] == dict(vocab_size=16, seq_len=16, keys=7, values=8)
    assert {k: payload[k] for k in ("steps", "batch_size", "lr", "sequences", "seed")} == {
        k: settings[k] for k in ("steps", "batch_size", "lr", "sequences", "seed")}
    assert payload["base"] == base.to_dict() and payload["pairs"] == [2, 4]
    for change, field in ((dict(task=RecallTask(vocab_size=16, seq_len=20)), "task"), (dict(sequences=7), "sequences"),
                          (dict(seed=8), "seed")):
        args = dict(task=task, **settings) | change
        with pytest.raises(common.UsageError, match=rf"was written with other {field}"):
            recall.run(base, args.pop("task"), [2, 4], models=["mixcon"], resume=True, **args)


@pytest.mark.parametrize("bench", ["filler", "ablate"])
def test_filler_and_ablate_results_record_every_setting_a_resume_must_match(bench, tmp_path, monkeypatch):
    from mixcon.benchmarks import ablate, bytes_lm, filler

    def fake_score(config, train, held_out, *, ratio, steps, batch_size, lr, seed, device):
        """`bytes_lm.train_and_score` without training: a score from the seed and the ratio."""
        return dict(layout=config.layout_string(), params=1, active_params=1, train_s=0.0, final_loss=1.0,
                    bits_per_byte=8.0 + seed / 100 + ratio)

    monkeypatch.setattr(bytes_lm, "train_and_score", fake_score)
    stream = torch.arange(400) % 200
    base = MixConConfig.preset("tiny", d_model=16)
    settings = dict(real_len=8, steps=1, batch_size=2, lr=1e-3, eval_windows=5, out_dir=tmp_path)
    if bench == "filler":
        def go(resume=False, **change):
            return filler.run(base, stream, [0.0], seed=3, models=["mixcon"], resume=resume, **(settings | change))
    else:
        def go(resume=False, **change):
            return ablate.run(base, {"no-control": dict(conba_control=False)}, stream, [3], resume=resume,
                              **(settings | change))
    go()
    payload = json.loads((tmp_path / f"{bench}.json").read_text())
    assert {k: payload[k] for k in ("real_len", "steps", "batch_size", "lr", "eval_windows")} == {
        k: v for k, v in settings.items() if k != "out_dir"}
    assert payload["base"] == base.to_dict() and payload["bytes"] == 400
    for field, value in (("real_len", 9), ("eval_windows", 4), ("batch_size", 3)):
        with pytest.raises(common.UsageError, match=rf"was written with other {field}"):
            go(resume=True, **{field: value})


def test_byte_windows_hold_out_the_streams_end_and_need_twice_its_length():
    from mixcon.benchmarks import bytes_lm

    train, held = bytes_lm.split_windows(torch.arange(100), 5, 4)
    assert torch.equal(train, torch.arange(80)) and torch.equal(held, torch.arange(80, 100).view(4, 5))
    assert bytes_lm.split_windows(torch.arange(40), 5, 4)[0].numel() == 20
    with pytest.raises(common.UsageError, match="the corpus gives 39 bytes; --eval-windows 4 x --real-len 5 needs "
                                                "at least 40"):
        bytes_lm.split_windows(torch.arange(39), 5, 4)


def test_a_byte_stream_takes_max_bytes_of_the_corpus_and_an_eos(tmp_path):
    from mixcon.benchmarks import bytes_lm

    (tmp_path / "a.txt").write_text("x" * 500)
    stream = bytes_lm.byte_stream(str(tmp_path / "a.txt"), 101)
    assert stream.numel() == 102 and int(stream[-1]) == bytes_lm.TOKENIZER.eos_id


@pytest.mark.parametrize("bench", ["filler", "ablate"])
def test_a_glob_corpus_leaves_out_the_results_it_holds(bench, tmp_path, monkeypatch):
    """--out inside a glob --corpus: the stream is the corpus's text, not an earlier run's JSON beside it."""
    import importlib

    module = importlib.import_module(f"mixcon.benchmarks.{bench}")
    (tmp_path / "a.txt").write_text("x" * 500)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{bench}.json").write_text("{}" * 100)  # an earlier run's results
    streams = []
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: streams.extend(
        a for a in args if isinstance(a, torch.Tensor)))
    assert main(["bench", bench, "--corpus", f"{tmp_path}/**", "--out", str(tmp_path / "out"), "--eval-windows", "2",
                 "--real-len", "8"]) == 0
    assert [s.numel() for s in streams] == [501]  # the 500 bytes and an EOS


def test_training_and_scoring_start_from_the_seeds_init_and_report_bits_per_byte(monkeypatch):
    """The model starts from torch.manual_seed(seed)'s init; held-out fillers are placed from seed + 1; nats of the
    held-out bytes become bits per byte; the final loss is the mean of the last 20 steps."""
    import math

    from mixcon.benchmarks import bytes_lm

    seen = {}

    def briefly(model, batch, *, steps, lr, seed):
        seen["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return [5.0] * 10 + [2.0] * 20

    def loss(model, held_out, ratio, filler_id, *, seed):
        seen["filler_seed"] = seed
        return 3 * math.log(2)

    monkeypatch.setattr(bytes_lm.common, "train_briefly", briefly)
    monkeypatch.setattr(bytes_lm, "filler_loss", loss)
    config = MixConConfig.preset("tiny", d_model=16)
    row = bytes_lm.train_and_score(config, torch.arange(200) % 50, torch.zeros(2, 8, dtype=torch.long), ratio=0.5,
                                   steps=30, batch_size=2, lr=1e-3, seed=5, device="cpu")
    assert row["bits_per_byte"] == pytest.approx(3.0) and row["final_loss"] == 2.0 and seen["filler_seed"] == 6
    torch.manual_seed(5)
    fresh = MixConForCausalLM(config.replace(vocab_size=bytes_lm.TOKENIZER.vocab_size)).state_dict()
    assert all(torch.equal(seen["init"][k], v) for k, v in fresh.items())


def test_scan_benchmark_rows_from_fixed_timings_chunks_and_a_first_form(tmp_path, monkeypatch):
    """Each `torch cC` row scans with chunk C; errors against the first form; FLOP/s, bytes/s and the roofline factor
    from the shapes, a fixed 10 ms, a 100 GFLOP/s peak and a 10 GB/s copy bandwidth."""
    chunks = []

    def scan_spy(*args, chunk_size, **kw):
        chunks.append(chunk_size)
        y, *rest = conba_scan(*args, chunk_size=chunk_size, **kw)
        return (y + (chunk_size == 16), *rest)  # the second form off by one

    monkeypatch.setattr(scan, "conba_scan", scan_spy)
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda **kw: 100.0)
    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda **kw: 10.0)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats, warmup: fn() and 0.01)
    B, T, H, P, N = 2, 40, 2, 4, 4
    rows = scan.run([T], [B], repeats=1, out_dir=tmp_path, heads=H, head_dim=P, state=N, chunks=(8, 16),
                    variants=("control-tau2",), triton=False)
    assert set(chunks) == {8, 16} and [r["form"] for r in rows] == ["torch c8", "torch c16"]
    assert rows[0]["max_err"] == 0 and rows[1]["max_err"] == pytest.approx(1, abs=1e-5)
    moved = 4 * (2 * B * T * H * P + 2 * B * T * N + 2 * B * T * H) + 4 * B * H * P * N  # x in, y out, k, q, decays
    for row, C in zip(rows, (8, 16), strict=True):
        gflops = speed.scan_flops(B, T, H, P, N, C, True, 2) / 0.01 / 1e9
        assert row["gflops"] == pytest.approx(gflops) and row["peak_frac"] == pytest.approx(gflops / 100)
        assert row["gbs"] == pytest.approx(moved / 0.01 / 1e9) and row["bw_frac"] == pytest.approx(row["gbs"] / 10)
        assert row["x_roofline"] == pytest.approx(min(100 / gflops, 10 / row["gbs"]))
    payload = json.loads((tmp_path / "scan.json").read_text())
    assert (payload["matmul_peak_gflops"], payload["copy_gbs"]) == (100.0, 10.0)


def test_recall_training_draws_every_pair_count(monkeypatch):
    from mixcon.benchmarks import recall
    from mixcon.data.synthetic import RecallTask

    drawn = set()

    def briefly(model, batch, *, steps, lr, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            _, labels = batch(generator)
            drawn.add(int((labels[0] != -100).sum()))  # the asked keys: the pair count
        return [1.0]

    monkeypatch.setattr(recall.common, "train_briefly", briefly)
    recall.train_on_recall(None, RecallTask(vocab_size=16, seq_len=16), [1, 2, 4], steps=60, batch_size=2, lr=1e-3)
    assert drawn == {1, 2, 4}


def test_matvec_weights_add_up_to_the_megabytes_asked(monkeypatch):
    """Whole `small` decoding steps of weights (~4.3 MiB each), as many as come nearest --megabytes."""
    monkeypatch.setattr(matvec.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats, warmup: fn() is not None and 0.01)
    per_step = sum(n * k for n, k in matvec.SMALL_STEP) * 4 / 2**20
    for megabytes, steps in ((9, 2), (21, 5), (1, 1)):
        row = matvec.run([1], megabytes=megabytes, repeats=1, out_dir=None)[0]
        assert row["F.linear eager GB/s"] == pytest.approx(steps * per_step * 2**20 / 0.01 / 1e9)


def test_ablate_summary_of_one_seed_has_no_spread_and_a_variant_without_its_base_seed_no_delta():
    from mixcon.benchmarks import ablate

    def run(variant, seed, bits):
        return dict(variant=variant, seed=seed, bits_per_byte=bits, layout="C", params=2, active_params=1,
                    train_s=1.0)

    rows = {r["variant"]: r for r in ablate.summarize([run("base", 0, 8.0), run("v", 0, 7.5), run("w", 1, 7.0)])}
    assert (rows["base"]["std"], rows["base"]["delta"], rows["base"]["delta_std"]) == (None, 0.0, None)
    assert (rows["v"]["bits_per_byte"], rows["v"]["delta"], rows["v"]["seeds"]) == (7.5, -0.5, 1)
    assert rows["w"]["delta"] is None  # seed 1 has no base run to pair with


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
