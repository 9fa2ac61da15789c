"""In-process A/B on the Intel Xeon without AMX (docs/benchmarks.md §40): the two changes of 2026-12-08 together
against the code before them, on an eager training step of `small` (8 x 512 tokens, fp32, fused AdamW) and on one
Conba layer's forward + backward at (8, 512): the chunked scan of `--before` (its delayed readout taken apart by
slices, pad and cat) and `F.rms_norm` in the RMSNorm modules, against the working tree. Forms alternate; medians
after one warm-up round (it reads the old scan from git, in a git checkout).
Usage: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_stop59.py --before 4db7886"""
import argparse

import torch
import torch.nn.functional as F
from old_code import alternating_medians, old_module

import mixcon.layers.conba as conba
import mixcon.layers.norm as norm
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.training.optim import build_optimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--before", required=True, help="the commit whose scan is 'before'")
parser.add_argument("--rounds", type=int, default=12)
args = parser.parse_args()

VARIANTS = {
    "before": (staticmethod(old_module(args.before, "mixcon/ops/chunk.py").conba_scan),
               lambda self, x: F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)),
    "after": (conba.Conba.__dict__["scan_fn"], norm.RMSNorm.forward),
}


def use(name: str) -> None:
    conba.Conba.scan_fn, norm.RMSNorm.forward = VARIANTS[name]


torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small"))
opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
ids = torch.randint(0, model.config.vocab_size, (8, 513))
layer, u = model.layers[0].mixer, torch.randn(8, 512, model.config.d_model, requires_grad=True)


def train_step() -> None:
    model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def conba_layer() -> None:
    layer(u).sum().backward()


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; scan of {args.before} and F.rms_norm vs the "
      f"working tree")
print("what                          before s  after s  ratio")
for label, fn, rounds in [("Conba layer fwd+bwd 8x512", conba_layer, 3 * args.rounds),
                          ("train step 8x512", train_step, args.rounds)]:
    r = alternating_medians(list(VARIANTS), use, fn, rounds)
    print(f"{label:<29} {r['before']:8.3f} {r['after']:8.3f}  {r['before'] / r['after']:.3f}x")
use("after")
