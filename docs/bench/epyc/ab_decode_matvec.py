"""In-process A/B of two eager-decoding changes on `small` (fp32, CPU, one sequence), variants alternating,
medians of the last 12 of 15 rounds of one decoding step at the same position (ab_decode_eager.py's
`median_ms`, on its model):
(1) one-row products as F.linear (MKL's matrix-vector product) vs `ops.linear`'s multiply-sum in cache-sized
    blocks (with each chosen expert read in place);
(2) one token's MoE: the K chosen experts gathered (a copy of their weights) and multiplied by bmm vs each
    read in place (with the multiply-sum of (1)).
Usage: python ab_decode_matvec.py"""
import torch
import torch.nn.functional as F
from ab_decode_eager import median_ms  # (run from its folder's script path: python docs/bench/epyc/...)

import mixcon.ops.linear as ops_linear
from mixcon.layers.moe import MoE

EAGER_ROW, IN_PLACE = ops_linear._eager_row, MoE.combine_gathered


def gathered(self: MoE, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The code before: the chosen experts' weights gathered, then batched products."""
    M, K = experts.shape
    e = experts.reshape(-1)
    x = h.repeat_interleave(K, dim=0)[:, None]
    gate, up = torch.bmm(x, self.w_gate_up[e].transpose(1, 2)).chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, self.w_down[e].transpose(1, 2))[:, 0]
    return (weights.reshape(-1, 1).to(ys.dtype) * ys).view(M, K, -1).sum(1).to(h.dtype)


def blas() -> None:
    ops_linear._eager_row, MoE.combine_gathered = (lambda x, w, b: False), IN_PLACE


def multiply_sum() -> None:
    ops_linear._eager_row, MoE.combine_gathered = EAGER_ROW, IN_PLACE


def gather() -> None:
    ops_linear._eager_row, MoE.combine_gathered = EAGER_ROW, gathered


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("(1) one-row products: context  F.linear ms  multiply-sum ms  ratio")
for context in (1024, 16384):
    r = median_ms({"blas": blas, "sum": multiply_sum}, 1, context, context + 1)
    print(f"    {context:<8} {r['blas']:9.2f} {r['sum']:9.2f}  {r['blas'] / r['sum']:.2f}x")
print("(2) one token's MoE: context  gathered ms  in place ms  ratio")
for context in (1024, 16384):
    r = median_ms({"gather": gather, "in place": multiply_sum}, 1, context, context + 1)
    print(f"    {context:<8} {r['gather']:9.2f} {r['in place']:9.2f}  {r['gather'] / r['in place']:.2f}x")
multiply_sum()
