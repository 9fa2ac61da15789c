"""In-process A/B on the Intel Xeon (docs/benchmarks.md §24): parts of `small` (fp32) at an earlier commit
("before") vs the working tree ("after"), on an eager training step (8 x 512 tokens, forward + backward + AdamW) and
an eager prefill of 2,048 tokens without autograd. The old code is read from git and swapped in; variants alternate;
medians after one warm-up round. Parts: `moe` (the MoE layer's methods), `scan` (the chunked Conba scan),
`cross_entropy` (the LM head's loss, `linear_cross_entropy`) and `conv` (Conba's causal conv, `causal_conv`).
Usage (in a git checkout):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_train_step.py --before a0b08ed --part moe"""
import argparse
import types

import torch
from old_code import alternating_medians, old_module

import mixcon.layers.conba as conba
import mixcon.layers.moe as moe
import mixcon.models.mixcon as models
from mixcon import MixConConfig, MixConForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--before", required=True, help="the commit whose code is 'before'")
parser.add_argument("--part", required=True, choices=["moe", "scan", "cross_entropy", "conv"])
parser.add_argument("--rounds", type=int, default=8)
args = parser.parse_args()


if args.part == "moe":
    owner, old = moe.MoE, old_module(args.before, "mixcon/layers/moe.py").MoE
    names = ("expert", "combine", "combine_gathered")
elif args.part == "cross_entropy":
    owner, old = models, old_module(args.before, "mixcon/ops/cross_entropy.py")
    names = ("linear_cross_entropy",)
elif args.part == "conv":
    owner, old = conba, old_module(args.before, "mixcon/ops/conv.py")
    names = ("causal_conv",)
else:
    old_scan = old_module(args.before, "mixcon/ops/chunk.py").conba_scan
    owner, old = conba.Conba, types.SimpleNamespace(scan_fn=staticmethod(old_scan))
    names = ("scan_fn",)
VARIANTS = {"before": {n: vars(old)[n] for n in names}, "after": {n: owner.__dict__[n] for n in names}}


def use(name: str) -> None:
    for attribute, value in VARIANTS[name].items():
        setattr(owner, attribute, value)


torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
V = model.config.vocab_size
batch = torch.randint(0, V, (8, 513))
prompt = torch.randint(0, V, (1, 2048))


def train_step() -> None:
    model(batch[:, :-1], labels=batch[:, 1:], return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def prefill() -> None:
    with torch.no_grad():
        model(prompt, logits_to_keep=1)


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.part} of {args.before} vs the working tree")
print("what                      before s  after s  ratio")
for label, fn in [("train step 8x512", train_step), ("prefill 2048 (no grad)", prefill)]:
    r = alternating_medians(list(VARIANTS), use, fn, args.rounds)
    print(f"{label:<25} {r['before']:8.3f} {r['after']:8.3f}  {r['before'] / r['after']:.3f}x")
use("after")
