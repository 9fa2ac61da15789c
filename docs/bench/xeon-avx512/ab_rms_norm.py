"""In-process A/B on the Intel Xeon without AMX (docs/benchmarks.md §40): `mixcon.ops.rms_norm` (a hand-written
gradient on a CPU) against `F.rms_norm` (autograd's decomposition on a CPU), alone on (8, 512, 256) and in the
RMSNorm modules of an eager training step of `small` (8 x 512 tokens, fp32, fused AdamW). Forms alternate; medians
after one warm-up round.
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon-avx512/ab_rms_norm.py [--rounds 16]"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mixcon.layers.norm as norm
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.ops import rms_norm
from mixcon.training.optim import build_optimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=16)
args = parser.parse_args()

FORMS = {"F.rms_norm": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps), "ops.rms_norm": rms_norm}


def medians(fn, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for r in range(rounds + 1):
        for name in (list(FORMS) if r % 2 else list(FORMS)[::-1]):
            start = time.perf_counter()
            fn(FORMS[name])
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


torch.manual_seed(0)
x = torch.randn(8, 512, 256, requires_grad=True)
w = torch.ones(256, requires_grad=True)
out_grad = torch.randn_like(x)
model = MixConForCausalLM(MixConConfig.preset("small"))
opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
ids = torch.randint(0, model.config.vocab_size, (8, 513))


def alone(form) -> None:
    torch.autograd.grad(form(x, w, 1e-5), (x, w), out_grad)


def train_step(form) -> None:
    norm.RMSNorm.forward = lambda self, h: form(h, self.weight, self.eps)
    model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("what                                 F.rms_norm  ops.rms_norm  ratio")
for label, fn, rounds, unit in [("alone (8, 512, 256) fwd+bwd, ms", alone, 40, 1e3),
                                ("train step 8x512 (32 RMSNorms), s", train_step, args.rounds, 1)]:
    r = medians(fn, rounds)
    a, b = r["F.rms_norm"], r["ops.rms_norm"]
    print(f"{label:<36} {a * unit:10.3f} {b * unit:13.3f}  {a / b:.3f}x")
