"""In-process A/B of two eager-decoding changes on `small` (fp32, CPU, one sequence), variants alternating,
medians of the last 12 of 15 rounds of one decoding step at the same position:
(1) one-row products as F.linear (MKL's matrix-vector product) vs `ops.linear`'s multiply-sum in cache-sized
    blocks (with each chosen expert read in place);
(2) one token's MoE: the K chosen experts gathered (a copy of their weights) and multiplied by bmm vs each
    read in place (with the multiply-sum of (1)).
Usage: python ab_decode_matvec.py"""
import statistics
import time

import torch
import torch.nn.functional as F

import mixcon.ops.linear as ops_linear
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.layers.moe import MoE

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small")).eval()
V = model.config.vocab_size
EAGER_ROW, IN_PLACE = ops_linear._eager_row, MoE.combine_gathered


def gathered(self: MoE, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The code before: the chosen experts' weights gathered, then batched products."""
    M, K = experts.shape
    e = experts.reshape(-1)
    x = h.repeat_interleave(K, dim=0)[:, None]
    gate, up = torch.bmm(x, self.w_gate_up[e].transpose(1, 2)).chunk(2, dim=-1)
    ys = torch.bmm(F.silu(gate) * up, self.w_down[e].transpose(1, 2))[:, 0]
    return (weights.reshape(-1, 1).to(ys.dtype) * ys).view(M, K, -1).sum(1).to(h.dtype)


def median_ms(cases: dict, context: int, rounds: int = 15) -> dict:
    ids = torch.randint(0, V, (1, context))
    times = {name: [] for name in cases}
    with torch.no_grad():
        cache = model.new_cache(1, max_length=context + 1)
        model(ids, cache=cache, logits_to_keep=1)
        token = ids[:, -1:].contiguous()
        for r in range(rounds):
            for name in (list(cases) if r % 2 else list(cases)[::-1]):
                cases[name]()
                start = time.perf_counter()
                model(token, cache=cache)
                times[name].append(time.perf_counter() - start)
                cache.seqlen -= 1  # decode the same position again (the cache does not move on)
                cache.positions -= 1
                for layer in cache.layers:
                    if hasattr(layer, "ptr"):
                        layer.ptr = (layer.ptr - 1) % len(layer.slots)
    return {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}


def blas() -> None:
    ops_linear._eager_row, MoE.combine_gathered = (lambda x, w, b: False), IN_PLACE


def multiply_sum() -> None:
    ops_linear._eager_row, MoE.combine_gathered = EAGER_ROW, IN_PLACE


def gather() -> None:
    ops_linear._eager_row, MoE.combine_gathered = EAGER_ROW, gathered


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("(1) one-row products: context  F.linear ms  multiply-sum ms  ratio")
for context in (1024, 16384):
    r = median_ms({"blas": blas, "sum": multiply_sum}, context)
    print(f"    {context:<8} {r['blas']:9.2f} {r['sum']:9.2f}  {r['blas'] / r['sum']:.2f}x")
print("(2) one token's MoE: context  gathered ms  in place ms  ratio")
for context in (1024, 16384):
    r = median_ms({"gather": gather, "in place": multiply_sum}, context)
    print(f"    {context:<8} {r['gather']:9.2f} {r['in place']:9.2f}  {r['gather'] / r['in place']:.2f}x")
multiply_sum()
