"""In-process A/B on the Intel Xeon (docs/benchmarks.md §24): the MoE layer's grouped combine of commit a0b08ed
("before": each expert indexes its tokens, h[idx], and its stacked weights, w[e], so that the backward fills an
(M, d) and an expert-weights-sized zero tensor per expert) vs the working tree ("after": one gather of the tokens
grouped by expert, split per expert, the stacked weights unbound once). `small`, fp32: an eager training step
(8 x 512 tokens, forward + backward + AdamW) and an eager prefill of 2,048 tokens without autograd. The old methods
are read from git and swapped in; variants alternate; medians after one warm-up round.
Usage (in a git checkout): GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/xeon/ab_moe_grouped.py"""
import statistics
import subprocess
import sys
import time
import types

import torch

import mixcon.layers.moe as new_moe
from mixcon import MixConConfig, MixConForCausalLM

BEFORE = "a0b08ed"
source = subprocess.run(["git", "show", f"{BEFORE}:mixcon/layers/moe.py"], check=True, capture_output=True,
                        text=True).stdout
old_moe = types.ModuleType("old_moe")
sys.modules["old_moe"] = old_moe
exec(compile(source, f"{BEFORE}:mixcon/layers/moe.py", "exec"), old_moe.__dict__)
METHODS = ("expert", "combine", "combine_gathered")
VARIANTS = {"before": {m: old_moe.MoE.__dict__[m] for m in METHODS},
            "after": {m: new_moe.MoE.__dict__[m] for m in METHODS}}


def use(name: str) -> None:
    for method, fn in VARIANTS[name].items():
        setattr(new_moe.MoE, method, fn)


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


def medians(fn, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds + 1):
        for name in (list(VARIANTS) if r % 2 else list(VARIANTS)[::-1]):
            use(name)
            start = time.perf_counter()
            fn()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("what                      before s  after s  ratio")
for label, fn, rounds in [("train step 8x512", train_step, 8), ("prefill 2048 (no grad)", prefill, 8)]:
    r = medians(fn, rounds)
    print(f"{label:<25} {r['before']:8.3f} {r['after']:8.3f}  {r['before'] / r['after']:.3f}x")
use("after")
