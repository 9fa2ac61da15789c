"""In-process A/B: a training step of `small` (8 x 512, fp32, eager) with the loss from whole logits vs
return_logits=False (ops.linear_cross_entropy); the two alternate, medians of 5 each."""
import resource
import statistics
import time

import torch

from mixcon.config import MixConConfig
from mixcon.models.mixcon import MixConForCausalLM

torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("small"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 8192, (8, 513))


def step(fused: bool) -> None:
    loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=not fused).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


times = {False: [], True: []}
faults = {False: [], True: []}
for fused in (False, True):
    step(fused)
for _ in range(5):
    for fused in (False, True):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step(fused)
        times[fused].append(time.perf_counter() - start)
        faults[fused].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
for fused in (False, True):
    print(f"{'linear_cross_entropy' if fused else 'whole logits':>20}: {statistics.median(times[fused]):.2f} s/step, "
          f"{statistics.median(faults[fused]):.0f} page faults/step")
