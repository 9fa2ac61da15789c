"""In-process A/B on the Intel Xeon without AMX (docs/benchmarks.md §39): two hand-written autograd Functions tried
for the eager training step of `small` (8 x 512 tokens, fp32, AdamW) against the code as it is, and dropped.
`swiglu`: SiLU(gate) * up with one (..., 2 * hidden) gradient (no split gradient to concatenate) in the dense FFNs
and the MoE experts; `rmsnorm`: RMSNorm (and the gated norm's) with a hand-written backward instead of autograd's
decomposition. Checks the gradients against the current code, then times the two alternating, medians of 8 rounds
after one warm-up round.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon-avx512/ab_fused_functions.py --part swiglu"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mixcon.layers.mlp as mlp
import mixcon.layers.moe as moe
import mixcon.layers.norm as norm
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.ops.linear import linear

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--part", required=True, choices=["swiglu", "rmsnorm"])
parser.add_argument("--rounds", type=int, default=8)
args = parser.parse_args()


class SiluMul(torch.autograd.Function):
    """SiLU(g) * u of gu = [g, u] (..., 2h) -> (..., h); the gradient of gu in one tensor."""

    @staticmethod
    def forward(ctx, gu):
        g, u = gu.chunk(2, dim=-1)
        ctx.save_for_backward(gu)
        return F.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, grad):
        (gu,) = ctx.saved_tensors
        g, u = gu.chunk(2, dim=-1)
        out = torch.empty_like(gu)
        dg, du = out.chunk(2, dim=-1)
        s = torch.sigmoid(g)
        torch.mul(g, s, out=du)  # SiLU(g)
        torch.mul(grad, u, out=dg)
        du.mul_(grad)
        dg.mul_(torch.mul(g, s).mul_(s.neg().add_(1)).add_(s))  # SiLU'(g) = s + g s (1 - s)
        return out


class RMS(torch.autograd.Function):
    """x / RMS(x) (· w), the backward written out."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, w, rstd)
        y = x * rstd
        return y.mul_(w) if w is not None else y

    @staticmethod
    def backward(ctx, grad):
        x, w, rstd = ctx.saved_tensors
        xh = x * rstd
        gw = grad * w if w is not None else grad.clone()
        m = (gw * xh).mean(-1, keepdim=True)
        gx = gw.sub_(xh.mul(m)).mul_(rstd)
        gwt = (grad * xh).flatten(0, -2).sum(0) if w is not None else None
        return gx, gwt, None


def swiglu_forward(self, h):
    return self.down(SiluMul.apply(self.gate_up(h)))


def expert(h, w_gate_up, w_down):
    return linear(SiluMul.apply(linear(h, w_gate_up)), w_down)


def rms_forward(self, x):
    return RMS.apply(x, self.weight, self.eps)


def gated_forward(self, o, z):
    h = (o * F.silu(z)).unflatten(-1, (self.groups, -1))
    return self.weight * RMS.apply(h, None, self.eps).flatten(-2)


if args.part == "swiglu":
    slots = [(mlp.SwiGLU, "forward", swiglu_forward), (moe.MoE, "expert", staticmethod(expert))]
else:
    slots = [(norm.RMSNorm, "forward", rms_forward), (norm.GatedRMSNorm, "forward", gated_forward)]
VARIANTS = {"now": [owner.__dict__[name] for owner, name, _ in slots], "function": [new for _, _, new in slots]}


def use(variant: str) -> None:
    for (owner, name, _), value in zip(slots, VARIANTS[variant], strict=True):
        setattr(owner, name, value)


torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (8, 513))


def loss() -> torch.Tensor:
    return model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss


def grads(variant: str) -> list[torch.Tensor]:
    use(variant)
    model.zero_grad(set_to_none=True)
    loss().backward()
    return [p.grad.clone() for p in model.parameters()]


now, function = grads("now"), grads("function")
err = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(now, function, strict=True))
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.part}: largest relative gradient "
      f"difference {err:.1e}")
times: dict[str, list[float]] = {name: [] for name in VARIANTS}
for r in range(args.rounds + 1):
    for name in (list(VARIANTS) if r % 2 else list(VARIANTS)[::-1]):
        use(name)
        start = time.perf_counter()
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if r:  # round 0 warms up
            times[name].append(time.perf_counter() - start)
now_s, function_s = (statistics.median(times[name]) for name in VARIANTS)
print(f"train step 8x512: now {now_s:.3f} s, with the Function {function_s:.3f} s: {now_s / function_s:.3f}x")
