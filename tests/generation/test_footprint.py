"""Serving memory beside other architectures (`mixcon.generation.footprint`, `mixcon info --compare`)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mixcon import MixConCache, MixConConfig, cache_nbytes
from mixcon.cli import main
from mixcon.generation.footprint import comparison_configs, footprint, max_context

GIB = 2**30


def test_comparison_configs_keep_the_widths_and_change_the_layout():
    small = MixConConfig.preset("small")
    configs = comparison_configs(small)
    assert {name: c.layout_string().split(" | ")[0] for name, c in configs.items()} == {
        "this model": "CCACCCAC/DMDMDMDM", "transformer": "AAAAAAAA/DDDDDDDD", "mixtral-like": "AAAAAAAA/MMMMMMMM",
        "jamba-like": "CCCCACCC/DMDMDMDM", "conba": "CCCCCCCC/DMDMDMDM"}
    assert (configs["mixtral-like"].n_experts, configs["mixtral-like"].top_k) == (8, 2)
    assert all(c.d_model == small.d_model and c.n_kv_heads == small.n_kv_heads for c in configs.values())
    # a layout given by pattern and conba_per_block: the others take the default placement
    patterned = small.replace(layer_pattern="CACCCCAC", conba_per_block=6, moe_pattern="MDMDMDMD")
    configs = comparison_configs(patterned)
    assert configs["this model"].layout_string().startswith("CACCCCAC/MDMDMDMD")
    assert configs["jamba-like"].layout_string().startswith("CCCCACCC/MDMDMDMD")
    assert configs["mixtral-like"].layout_string().startswith("AAAAAAAA/MMMMMMMM")
    assert configs["transformer"].layout_string().startswith("AAAAAAAA/DDDDDDDD")  # no MoE left from the pattern


def test_the_mixtral_like_comparison_routes_top_2_whatever_the_models_top_k():
    """A top-1 model beside Mixtral's 8 experts, top-2 (the active parameters count two experts), not top-1."""
    top1 = MixConConfig.preset("small").replace(top_k=1)
    mixtral = comparison_configs(top1)["mixtral-like"]
    assert (mixtral.n_experts, mixtral.top_k) == (8, 2)


def test_footprint_of_the_paper_model_by_hand():
    """The paper's model at 256K tokens in bf16: 8 attention layers' K and V, 24 Conba layers' fp32 states
    (tau = 2 of them) and bf16 conv tails; 8-bit weights."""
    paper = MixConConfig.preset("mixcon-paper")
    f = footprint(paper, [262144], memory_bytes=80 * GIB, weight_bytes=1)
    kv = 8 * 2 * 262144 * paper.n_kv_heads * paper.attn_head_dim * 2
    assert kv == 8 * GIB
    heads = 2 * 4096 // 64
    conba = 24 * (2 * heads * 64 * 128 * 4 + 3 * (heads * 64 + 2 * 8 * 128) * 2)
    assert f.cache_bytes == {262144: kv + conba}
    assert f.layout == "CCACCCAC/DMDMDMDM x4" and f.weight_bytes == f.params
    assert 50e9 < f.params < 56e9 and 12e9 < f.active_params < 15e9  # Jamba's 52B / 12B class
    budget = 80 * GIB - f.weight_bytes
    assert f.max_context == (budget - conba) // (kv // 262144)


@pytest.mark.parametrize("name", ["this model", "transformer", "jamba-like"])
def test_max_context_is_the_longest_whose_allocated_cache_fits(name):
    config = comparison_configs(MixConConfig.preset("tiny"))[name]
    budget = 3_000_000
    n = max_context(config, budget, batch_size=2, dtype=torch.float32)
    assert cache_nbytes(config, 2, n, torch.float32) <= budget < cache_nbytes(config, 2, n + 1, torch.float32)
    assert MixConCache(config, 2, max_length=n, dtype=torch.float32).nbytes() <= budget
    assert max_context(config, cache_nbytes(config, 2, 1, torch.float32) - 1, batch_size=2, dtype=torch.float32) == 0


def test_max_context_of_every_budget_at_an_allocation_boundary():
    """Exactly n for the bytes of n tokens and for one byte short of those of n + 1; the cache of no tokens is the
    Conba states and conv tails alone (the K/V bytes grow linearly from 0)."""
    config = MixConConfig.preset("tiny")
    sizes = [cache_nbytes(config, 1, n, torch.float32) for n in range(42)]
    assert sizes[0] > 0 and all(b - a == sizes[1] - sizes[0] > 0 for a, b in itertools.pairwise(sizes))
    for n in range(1, 41):
        for budget in (sizes[n], sizes[n + 1] - 1):
            assert max_context(config, budget, batch_size=1, dtype=torch.float32) == n


def test_a_cache_that_does_not_grow_has_no_context_limit():
    conba = comparison_configs(MixConConfig.preset("tiny"))["conba"]
    assert max_context(conba, 10**6) == math.inf
    assert max_context(conba, cache_nbytes(conba, 1, 1, torch.bfloat16) - 1) == 0
    assert footprint(conba, [8], memory_bytes=1000).max_context == 0  # the weights alone do not fit


def test_info_compare_prints_the_table_and_draws_it(tmp_path, capsys):
    plot = tmp_path / "footprint.png"
    assert main(["info", "--config", "tiny", "--context", "8,64", "--compare", "--memory-gib", "0.001",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.split("beside other architectures")[1]
    lines = {line.split()[0]: line for line in out.splitlines()[2:-1]}  # the last: "wrote FILE"
    assert list(lines) == ["this", "transformer", "mixtral-like", "jamba-like", "conba"]
    assert lines["conba"].endswith("no limit") and "cache@64 GiB" in out
    transformer = comparison_configs(MixConConfig.preset("tiny"))["transformer"]
    weights = footprint(transformer, [], memory_bytes=0).weight_bytes
    assert lines["transformer"].split()[-1] == f"{max_context(transformer, int(0.001 * GIB) - weights):,}"
    assert plot.stat().st_size > 0


def test_info_compare_cells_are_the_footprints_figures(capsys):
    """Each row's parameters, active parameters, weight GiB and cache GiB at each context are those of its own
    footprint (32-bit weights, batch 2), in GiB of 2**30 bytes."""
    contexts = [4096, 262144]
    assert main(["info", "--config", "small", "--context", "4096,262144", "--compare", "--weight-bits", "32",
                 "--batch-size", "2"]) == 0
    table = capsys.readouterr().out.split("beside other architectures")[1].splitlines()[1:]
    header = table[0].split()
    assert header[2:7] == ["params", "active", "weights", "GiB", "cache@4096"]
    for name, config in comparison_configs(MixConConfig.preset("small")).items():
        (row,) = [line for line in table if line.strip().startswith(name)]
        cells = row.split(name)[1].split()
        f = footprint(config, contexts, memory_bytes=80 * GIB, batch_size=2, dtype=torch.bfloat16, weight_bytes=4)
        assert cells[2:7] == [f"{f.params / 1e6:.2f}M", f"{f.active_params / 1e6:.2f}M", f"{f.weight_bytes / GIB:.2f}",
                              *(f"{f.cache_bytes[n] / GIB:.3f}" for n in contexts)]


def test_info_compare_says_when_a_model_does_not_fit_at_all(capsys):
    """Weights (or one token's cache) over --memory-gib: "does not fit", not a longest context of 0."""
    assert main(["info", "--config", "tiny", "--context", "8", "--compare", "--memory-gib", "0.00001"]) == 0
    rows = capsys.readouterr().out.split("beside other architectures")[1].splitlines()[2:]
    assert len(rows) == 5 and all(row.endswith("does not fit") for row in rows)


def test_info_plot_needs_compare():
    with pytest.raises(SystemExit, match="add --compare"):
        main(["info", "--config", "tiny", "--plot", "x.png"])


@pytest.mark.parametrize("argv,message", [
    (["--compare", "--memory-gib", "0"], "argument --memory-gib: expected a finite number > 0, got '0'"),
    (["--compare", "--memory-gib", "inf"], "argument --memory-gib: expected a finite number > 0, got 'inf'"),
    (["--compare", "--memory-gib", "nan"], "argument --memory-gib: expected a finite number > 0, got 'nan'"),
    (["--compare", "--plot", "/no/such/dir/x.png"], "argument --plot: '/no/such/dir/x.png': no folder /no/such/dir"),
    (["--compare", "--plot", "out.txt"], "argument --plot: 'out.txt': the suffix must be one of matplotlib's formats"),
    (["--context", "1k"], "argument --context: expected comma-separated integers >= 1, got '1k'"),
    (["--context", "8,0"], "argument --context: expected comma-separated integers >= 1, got '8,0'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--dtype", "float32"], "argument --dtype: invalid choice: 'float32'"),
])
def test_info_rejects_bad_arguments_before_any_work(argv, message, capsys, monkeypatch):
    """Usage errors (exit 2) naming the flag and what it allows; the plot's path is checked before the table."""
    if "--plot" in argv:
        pytest.importorskip("matplotlib")  # without it, --plot says that it needs it
    monkeypatch.setattr("mixcon.cli.info.footprint", lambda *a, **kw: pytest.fail("computed the table"))
    with pytest.raises(SystemExit) as e:
        main(["info", "--config", "tiny", *argv])
    assert e.value.code == 2 and f"mixcon info: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(("batch_size", "context"), [(1, -5), (1, 10.5), (0, 8), (True, 8)])
def test_cache_nbytes_refuses_sizes_no_cache_has(batch_size, context):
    with pytest.raises(ValueError, match=r"cache_nbytes: batch_size=.* must be an integer >= 1 and context="):
        cache_nbytes(MixConConfig.preset("tiny"), batch_size, context)


def test_footprint_takes_its_batch_size_and_dtype_and_names_blocks_that_differ():
    """The cache sizes and the longest context are those of `batch_size` sequences in `dtype`; a model whose blocks
    differ shows each block; the Mixtral-like comparison has 8 experts, top-2, whatever the model's are."""
    tiny = MixConConfig.preset("tiny")  # 4 experts
    f = footprint(tiny, [64], memory_bytes=10**7, batch_size=3, dtype=torch.float32)
    assert f.cache_bytes == {64: cache_nbytes(tiny, 3, 64, torch.float32)} != {64: cache_nbytes(tiny, 1, 64)}
    assert f.max_context == max_context(tiny, 10**7 - f.weight_bytes, 3, torch.float32)
    assert f.max_context != max_context(tiny, 10**7 - f.weight_bytes)
    assert footprint(tiny, [], memory_bytes=10**9).layout == "CCAC/DMDM x2"
    assert footprint(tiny.replace(layer_pattern="AAAACCCC"), [], memory_bytes=10**9).layout == "AAAA/DMDM | CCCC/DMDM"
    mixtral = comparison_configs(tiny)["mixtral-like"]
    assert (mixtral.n_experts, mixtral.top_k) == (8, 2)
