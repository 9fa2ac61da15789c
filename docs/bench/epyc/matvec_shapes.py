"""One fp32 row times weights of several shapes on a CPU: F.linear vs `mixcon.ops.linear` (its eager multiply-sum
form, forced past its EAGER_MAX_K limit to time it), without autograd and forward + backward; enough distinct
weights (~200 MB) that each comes from memory. Medians of 9 passes.
Usage: python matvec_shapes.py"""
import statistics
import time

import torch
import torch.nn.functional as F

import mixcon.ops.linear as ops_linear

ops_linear.EAGER_MAX_K = 1 << 30  # time the multiply-sum at every shape
torch.manual_seed(0)


def seconds(f, n: int) -> float:
    for i in range(n):
        f(i)
    times = []
    for _ in range(9):
        start = time.perf_counter()
        for i in range(n):
            f(i)
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def multiply_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The eager form itself (ops.linear takes F.linear under autograd)."""
    rows = max(1, ops_linear.EAGER_BLOCK // x.shape[-1])
    return torch.cat([(x[..., None, :] * b).sum(-1) for b in w.split(rows)], dim=-1)


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("N x K: no grad F.linear ms, ops.linear ms, ratio; forward + backward F.linear ms, multiply-sum ms, ratio")
for N, K in [(4096, 2048), (2048, 2048), (8192, 256), (14336, 4096), (256, 8192), (32000, 512)]:
    n = max(2, int(200e6 / (N * K * 4)))
    weights = [torch.randn(N, K) for _ in range(n)]
    x = torch.randn(1, K)
    with torch.no_grad():
        a = seconds(lambda i, x=x, ws=weights: F.linear(x, ws[i]), n)
        b = seconds(lambda i, x=x, ws=weights: ops_linear.linear(x, ws[i]), n)
    xg = torch.randn(1, K, requires_grad=True)
    wg = [w.requires_grad_() for w in weights[:2]]
    c = seconds(lambda i, x=xg, ws=wg: F.linear(x, ws[i]).sum().backward(), 2)
    d = seconds(lambda i, x=xg, ws=wg: multiply_sum(x, ws[i]).sum().backward(), 2)
    print(f"{N} x {K}: {a * 1e3:.3f} {b * 1e3:.3f} {a / b:.2f}x; {c * 1e3:.2f} {d * 1e3:.2f} {c / d:.2f}x")
