"""Peak memory of attention masks at long context (docs/benchmarks.md §18): one case per process.

usage: python mask_memory.py {generate_padded,continue} T [tiny|tiny-conba]
  generate_padded: generate 16 tokens after two left-padded prompts of T tokens (16 pads in the first)
  continue:        prefill T/2 tokens into a cache, then continue it by T/2 tokens in one forward
Prints the rise of the process's peak resident memory (ru_maxrss, Linux) over its size before the call, and
the call's seconds."""

import json
import os
import resource
import sys
import time

import torch

from mixcon import MixConConfig, MixConForCausalLM

torch.set_num_threads(1)
op, T = sys.argv[1], int(sys.argv[2])
name = sys.argv[3] if len(sys.argv) > 3 else "tiny"
torch.manual_seed(0)
model = MixConForCausalLM(MixConConfig.preset("tiny", **({"attn_per_block": 0} if name == "tiny-conba" else {})))
model.eval()
ids = torch.randint(0, 256, (1, T))
with torch.no_grad():
    model(ids[:, :64])  # lazy initialisations out of the way
with open("/proc/self/statm") as statm:
    base = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident now
start = time.perf_counter()
with torch.no_grad():
    if op == "generate_padded":
        rows = torch.cat([ids, ids])
        mask = torch.ones_like(rows)
        mask[0, :16] = 0
        model.generate(rows, 16, attention_mask=mask)
    elif op == "continue":
        cache = model.new_cache(1, max_length=T)
        model(ids[:, : T // 2], cache=cache, logits_to_keep=1)
        model(ids[:, T // 2:], cache=cache, logits_to_keep=1)
    else:
        raise SystemExit(f"unknown case {op!r}")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print(json.dumps({"case": op, "T": T, "model": name, "seconds": round(seconds, 2),
                  "peak_rise_MB": round((peak - base) / 2**20, 1)}))
