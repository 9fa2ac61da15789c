"""Peak memory (RSS growth) of evaluation.document_nll (window mode, batch 8 x context 512) against vocabulary
size, in a fresh subprocess per case, beside the same model's forward with the fused training loss. Usage:
python eval_memory.py"""
import subprocess
import sys

CASE = r'''
import json, resource, sys, torch
torch.set_num_threads(1)
from mixcon import MixConConfig, MixConForCausalLM
from mixcon.evaluation.perplexity import document_nll
V, how = int(sys.argv[1]), sys.argv[2]
model = MixConForCausalLM(MixConConfig.preset("small", vocab_size=V, n_blocks=1)).eval()
g = torch.Generator().manual_seed(0)
docs = [torch.randint(3, V, (513,), generator=g).tolist() for _ in range(8)]
with torch.no_grad():
    model(torch.tensor([docs[0][:64]]))  # warm
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if how == "document_nll":
    document_nll(model, docs, pad_id=0, context=512, batch_size=8)
else:
    x, y = torch.tensor([d[:-1] for d in docs]), torch.tensor([d[1:] for d in docs])
    with torch.no_grad():
        model(x, labels=y, return_logits=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"V": V, "how": how, "peak_MiB": round((peak - base) / 1024), "logits_MiB": 8 * 512 * V * 4 / 2**20}))
'''
for V in (8192, 32768, 131072):
    for how in ("document_nll", "fused"):
        r = subprocess.run([sys.executable, "-c", CASE, str(V), how], capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr[-1500:], flush=True)
