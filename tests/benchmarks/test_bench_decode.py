"""`mixcon.benchmarks.decode`: decoding latency, prefill rate and cache bytes against context length."""

from __future__ import annotations

import itertools
import json
import types

import pytest
import torch

from mixcon.benchmarks import common, decode
from mixcon.cli import main
from mixcon.config import MixConConfig
from mixcon.models.mixcon import MixConForCausalLM


def test_tensor_bytes_counts_each_storage_once():
    x = torch.zeros(10)
    assert decode.tensor_bytes([x[1:], x, {"a": (x.view(2, 5),)}, torch.ones(3, dtype=torch.float64)]) == 40 + 24


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


@pytest.mark.parametrize("dtype,tie", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_decode_benchmark_rows_from_timings_and_bandwidths(tmp_path, monkeypatch, dtype, tie):
    """With the timings and bandwidths fixed: tokens/s, ms per token (the medians over the repeats of the prefills
    and of all their gaps), and the bound, the active weights (in the run's dtype; of an untied embedding table
    only the token's row) plus the cache that a generation allocates read once per token at the copy's read rate
    (half the copy's traffic)."""
    from mixcon.generation.generate import generation_capacity

    base = MixConConfig.preset("small", d_model=64, vocab_size=512, n_blocks=1, n_experts=4, mlp_hidden=128,
                               conba_head_dim=16, conba_state=16, tie_embeddings=tie)
    monkeypatch.setattr(decode, "copy_bandwidth_gbs", lambda device: 20.0)
    monkeypatch.setattr(decode, "stream_read_gbs", lambda device: 5.0)
    monkeypatch.setattr(decode, "hf_models", lambda base: {})
    # each model's three timed generations (of 3 new tokens; warm-ups take fewer): prefills of median 0.5 s (mean
    # 0.6, least 0.4), gaps of median 4 ms (mean 5.4; the last repeat's alone, 2)
    repeats = [(0.5, [0.004] * 3), (0.9, [0.010] * 3), (0.4, [0.001, 0.002, 0.004])]
    timings: dict[int, list] = {}
    monkeypatch.setattr(decode, "time_generation", lambda model, ids, n: (
        (*timings.setdefault(id(model), list(repeats)).pop(0), None) if n == 3 else (1.0, [1.0] * n, None)))
    monkeypatch.setattr(decode, "_plot", lambda rows, path: None)
    rows = decode.run([16], hf_max_context=16, new_tokens=3, repeats=3, out_dir=tmp_path, base=base, dtype=dtype)
    payload = json.loads((tmp_path / "decode.json").read_text())
    assert (payload["read_bandwidth_gbs"], payload["stream_read_gbs"], payload["rows"]) == (10.0, 5.0, rows)
    ours = next(r for r in rows if r["model"] == "mixcon")
    model = MixConForCausalLM(base).to(dtype)
    cache = model.new_cache(1, max_length=generation_capacity(16, 4)).nbytes()
    unread = 0 if tie else 511 * 64  # the embedding rows of the other 511 tokens
    read = (model.num_parameters(active=True) - unread) * dtype.itemsize + cache
    assert (ours["prefill_tok_s"], ours["decode_ms"], ours["decode_tok_s"]) == pytest.approx((32.0, 4.0, 250.0))
    assert ours["cache_MiB"] == cache / 2**20
    assert (ours["bound_ms"], ours["stream_bound_ms"]) == pytest.approx((read / 10e9 * 1e3, read / 5e9 * 1e3))


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_generation_is_timed_over_as_many_gaps_as_new_tokens(tiny_model, new_tokens, monkeypatch):
    """One token more than asked is generated: the first ends the prefill, each later one a decoding step. On a
    clock reading i² at its i-th reading (0 at the start): a prefill of 1, gaps of 3, 5, 7, ..."""
    model = tiny_model(dtype=torch.float32)
    prefill, gaps, cache_bytes = decode.time_generation(model, torch.randint(0, 300, (1, 5)), new_tokens)
    assert prefill > 0 and len(gaps) == new_tokens and all(g > 0 for g in gaps) and cache_bytes is None
    squares_clock(monkeypatch)
    assert decode.time_generation(model, torch.randint(0, 300, (1, 5)), new_tokens) == (
        1.0, [2.0 * i + 1 for i in range(1, new_tokens + 1)], None)


def squares_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's clock (and its token stamps') reads i² at its i-th reading, from 0."""
    readings = (float(i * i) for i in itertools.count())
    clock = types.SimpleNamespace(perf_counter=lambda: next(readings))
    monkeypatch.setattr(decode, "time", clock)
    monkeypatch.setattr(common, "time", clock)


def test_a_transformers_generation_is_timed_from_its_prompts_stamp(monkeypatch):
    """transformers' `generate` streams the prompt first: the prefill runs from that stamp (the second reading, 1) to
    the first new token's (4); the cache bytes are those of the cache it returns (K and V of the 5 + 2 fed
    positions)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).eval()
    squares_clock(monkeypatch)
    assert decode.time_generation(model, torch.randint(0, 300, (1, 5)), 2) == (3.0, [5.0, 7.0], 2 * 7 * 8 * 4)


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


def test_each_repeat_of_the_decode_benchmark_is_a_round_over_every_context(monkeypatch):
    """Contexts take turns as the models do: a context's warm-ups just before its first timed generations, then each
    later repeat one more round over every context (a machine that slows down over the run does not make long
    contexts look slow)."""
    calls = []

    def record(model, ids, new_tokens):
        calls.append((ids.shape[1], new_tokens))
        return 1.0, [1e-3] * new_tokens, None

    monkeypatch.setattr(decode, "time_generation", record)
    monkeypatch.setattr(decode, "hf_models", lambda base: {})
    rows = decode.run([8, 12], hf_max_context=0, new_tokens=3, repeats=3, out_dir=None,
                      base=MixConConfig.preset("tiny"))
    models = 3  # MixCon and its two twins
    after_warm_up = [call for call in calls if call[1] != 2]  # the first warm-ups: 8 and 16 tokens, 2 new ones
    assert after_warm_up == ([(8, 1)] * models + [(8, 3)] * models + [(12, 1)] * models + [(12, 3)] * models
                             + ([(8, 3)] * models + [(12, 3)] * models) * 2)
    assert [(r["context"], r["model"]) for r in rows] == [
        (c, m) for c in (8, 12) for m in ("mixcon", "transformer-twin", "conba-twin")]


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
