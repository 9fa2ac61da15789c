import builtins
import io

import pytest
import torch
import torch.nn.functional as F

import mixcon.ops.linear as ops_linear
from mixcon.layers.linear import Linear
from mixcon.ops.linear import EAGER_MAX_K, batched_linear, linear

SLOW_FEW_ROWS = 16  # FEW_ROWS where the BLAS is slow at few rows


@pytest.fixture
def slow_blas(monkeypatch):
    """The setting of a CPU whose BLAS is slow at few rows (MKL on AMD), whatever this one is."""
    monkeypatch.setattr(ops_linear, "SLOW_BLAS_ROWS", True)
    monkeypatch.setattr(ops_linear, "FEW_ROWS", SLOW_FEW_ROWS)


@pytest.fixture
def quick_blas(monkeypatch):
    """The setting of a CPU whose BLAS is quick at few rows (MKL on Intel)."""
    monkeypatch.setattr(ops_linear, "SLOW_BLAS_ROWS", False)
    monkeypatch.setattr(ops_linear, "FEW_ROWS", 1)


def traced_ops(fn, *args) -> set[str]:
    """The call targets in the FX graph torch.compile captures for fn(*args)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return {getattr(n.target, "__name__", str(n.target)) for g in graphs for n in g.graph.nodes
            if n.op in ("call_function", "call_method")}


@pytest.mark.parametrize("rows", [1, 3, SLOW_FEW_ROWS])
def test_compiled_few_rows_is_a_multiply_sum_equal_to_f_linear(rows, slow_blas):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 1, 24), torch.randn(40, 24), torch.randn(40)
    ops = traced_ops(linear, x, w, b)
    assert "linear" not in ops and "sum" in ops
    torch._dynamo.reset()
    compiled = torch.compile(linear, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(compiled(x, w), F.linear(x, w))


def test_many_rows_compiled_use_f_linear(slow_blas):
    x, w = torch.randn(SLOW_FEW_ROWS + 1, 24), torch.randn(40, 24)
    assert "linear" in traced_ops(linear, x, w)


def test_where_blas_is_quick_only_one_compiled_row_is_a_multiply_sum_and_eager_rows_are_f_linear(quick_blas):
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    assert "linear" not in traced_ops(linear, torch.randn(1, 24), w)
    assert "linear" in traced_ops(linear, torch.randn(2, 24), w)
    x = torch.randn(1, 1, 24)
    assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize(("cpuinfo", "slow"), [("vendor_id\t: AuthenticAMD\n", True),
                                               ("vendor_id\t: GenuineIntel\n", False), (None, True)])
def test_only_mkl_on_an_intel_cpu_is_taken_for_quick_at_few_rows(monkeypatch, cpuinfo, slow):
    """MKL's matrix-vector product is quick on Intel CPUs and slow on AMD ones (docs/benchmarks.md §20, §22); no
    /proc/cpuinfo (macOS): the vendor from `platform`; another BLAS: not measured, the multiply-sum forms."""
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO("processor\t: 0\n" + cpuinfo)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(ops_linear.platform, "processor", lambda: "arm")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    assert ops_linear.slow_blas_rows() is slow
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert ops_linear.slow_blas_rows() is True


@pytest.mark.parametrize("K", [24, EAGER_MAX_K])  # (the longest row it takes)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_one_row_is_a_blocked_multiply_sum_equal_to_f_linear(dtype, K, monkeypatch, slow_blas):
    """One row in eager mode (a decoding step of one sequence): the multiply-sum, in blocks of output rows
    (here 3 of 16, 16 and 8), equal to F.linear; the product does not call F.linear."""
    torch.manual_seed(0)
    monkeypatch.setattr(ops_linear, "EAGER_BLOCK", 16 * K)
    x, w, b = torch.randn(1, 1, K, dtype=dtype), torch.randn(40, K, dtype=dtype), torch.randn(40, dtype=dtype)
    monkeypatch.setattr(ops_linear.F, "linear", None)  # (would fail if called)
    got, got_bias = linear(x, w), linear(x, w, b)
    monkeypatch.undo()
    # two sums of K products in different orders: rounding grows with K (3.7e-5 apart at K = 1024 in fp32 on an
    # AMD EPYC), a wrong or missing term would be off by about one
    tol = dict(rtol=1.3e-6 if dtype == torch.float32 else 1e-7, atol=K * torch.finfo(dtype).eps)
    torch.testing.assert_close(got, F.linear(x, w), **tol)
    torch.testing.assert_close(got_bias, F.linear(x, w, b), **tol)


@pytest.mark.parametrize("case", ["two rows", "bf16", "autocast", "autograd", "bias autograd", "long rows", "fp64 bias",
                                  "fp64 weight"])
def test_eager_products_outside_one_short_fp32_row_without_autograd_are_f_linear(case, slow_blas):
    """Where BLAS is as fast (rows longer than EAGER_MAX_K, backward passes) or the sum would round (bf16), or
    F.linear's own checks should speak (a bias or weight of another dtype)."""
    torch.manual_seed(0)
    K = EAGER_MAX_K + 1 if case == "long rows" else 24
    x, w = torch.randn(2 if case == "two rows" else 1, K), torch.randn(40, K)
    b = torch.randn(40, dtype=torch.float64) if case == "fp64 bias" else None
    if case == "bias autograd":
        b = torch.randn(40, requires_grad=True)
    if case == "fp64 weight":
        w = w.double()
    if case == "bf16":
        x, w = x.bfloat16(), w.bfloat16()
    if case == "autograd":
        w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        if case in ("fp64 bias", "fp64 weight"):
            with pytest.raises(RuntimeError):
                linear(x, w, b)
        else:
            assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_linear_traces_with_fx(slow_blas):
    """torch.fx.symbolic_trace (FX-mode quantization, other graph tools) sees F.linear, also where one eager row
    would take the multiply-sum (a Proxy has no shape to decide by)."""
    graph = torch.fx.symbolic_trace(Linear(8, 4))
    x = torch.randn(1, 8)
    assert torch.equal(graph(x), F.linear(x, graph.weight, graph.bias))


def test_linear_module_keeps_nn_linear_parameters():
    layer = Linear(8, 5, bias=False)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight"]
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


@pytest.mark.parametrize("rows", [1, SLOW_FEW_ROWS])
def test_batched_linear_compiled_few_rows_is_a_multiply_sum_equal_to_bmm(rows, slow_blas):
    torch.manual_seed(0)
    x, w = torch.randn(3, rows, 24), torch.randn(3, 40, 24)
    want = torch.bmm(x, w.transpose(1, 2))
    torch.testing.assert_close(batched_linear(x, w), want)
    ops = traced_ops(batched_linear, x, w)
    assert "bmm" not in ops and "sum" in ops
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(batched_linear, backend="eager", fullgraph=True)(x, w), want)


def test_compiled_few_rows_under_autocast_come_back_in_the_autocast_dtype(slow_blas):
    """As F.linear and bmm do under CPU bf16 autocast (the multiply-sum itself is not an op autocast casts)."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 24), torch.randn(40, 24)
    for fn, args, eager in ((linear, (x, w), F.linear), (batched_linear, (x[None], w[None]),
                                                          lambda a, b: torch.bmm(a, b.transpose(1, 2)))):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = compiled(*args), eager(*args)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        assert compiled(*args).dtype == torch.float32  # autocast off: fp32 as given
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves fp64 products in fp64
            assert compiled(*(a.double() for a in args)).dtype == torch.float64
