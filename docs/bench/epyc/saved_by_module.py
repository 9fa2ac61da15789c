"""What a training step of `small` and its twins keeps for backward (docs/benchmarks.md §33): the bytes of the
tensors autograd saves in one forward (weights left out, each storage counted once), by the module that saved
them, plain and with activation checkpointing of every layer. fp32, eager, no backward run (what is saved is known
once the forward ends).
Usage: python docs/bench/epyc/saved_by_module.py [batch] [seq_len]"""
import sys
from collections import defaultdict

import torch

from mixcon import MixConConfig, MixConForCausalLM
from mixcon.benchmarks.common import twins
from mixcon.training.distributed import checkpoint_layers

B = int(sys.argv[1]) if len(sys.argv) > 1 else 8
T = int(sys.argv[2]) if len(sys.argv) > 2 else 512
torch.manual_seed(0)
ids = torch.randint(0, 8192, (B, T))


def saved_by_module(model: MixConForCausalLM) -> dict[str, int]:
    """Bytes saved for backward in one forward with labels, by the kind of module (per layer kind, all layers)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack, seen = ["other (embedding, layer inputs, head, loss)"], {}
    for layer in model.layers:
        for part in (layer.mixer, layer.ffn, layer.mixer_norm, layer.ffn_norm):
            kind = "RMSNorms" if "Norm" in type(part).__name__ else type(part).__name__
            part.register_forward_pre_hook(lambda _m, _a, kind=kind: stack.append(kind))
            part.register_forward_hook(lambda _m, _a, _o: stack.pop() and None)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), (stack[-1], storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    by = defaultdict(int)
    for kind, nbytes in seen.values():
        by[kind] += nbytes
    return dict(by)


print(f"torch {torch.__version__}, batch {B} x {T} tokens, fp32")
print("| model | activation checkpointing | saved MiB | KiB per token | by module (MiB) |")
print("| --- | --- | ---: | ---: | --- |")
for name, config in twins(MixConConfig.preset("small")).items():
    for checkpointing in (False, True):
        model = MixConForCausalLM(config)
        checkpoint_layers(model, checkpointing)
        by = saved_by_module(model)
        total = sum(by.values())
        parts = ", ".join(f"{kind} {n / 2**20:,.0f}" for kind, n in sorted(by.items(), key=lambda kv: -kv[1]))
        print(f"| {name} | {'every layer' if checkpointing else 'off'} | {total / 2**20:,.0f} | "
              f"{total / (B * T) / 1024:,.0f} | {parts} |", flush=True)
