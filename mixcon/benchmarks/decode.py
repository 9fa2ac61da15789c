"""Decode latency and cache memory vs context length, side by side in one process.

Models: the `small` preset (MixCon; any config with --config / --set, e.g. --set conba_kernel=triton on
a GPU), its Transformer and pure-Conba twins (same widths), and transformers' JambaForCausalLM and
LlamaForCausalLM at the same width and depth. A streamer stamps each generated token: prefill is the
time to the first, per-token latency the median gap after it; each repeat is a round over every context in
which the models take turns, one `generate` each, so that a slow phase of the machine hits all models and all
contexts alike (the ratios between contexts as well as between models);
the bandwidth bound is the bytes one token must read (active weights, of an embedding table the LM head does
not share only the token's row, + the cache `generate` allocates)
over the measured copy bandwidth (the issue's definition; a step that only reads can beat it); the stream
bound, the lower bound, divides by the measured read bandwidth of a sum over a large tensor instead (all
threads; ~2× the copy's on a CPU). transformers' models report the bytes of the cache their `generate`
returns. `--compile` adds our models
decoding through `compile_decode` (torch.compile of the whole step) and prefilling through
`compile_prefill` (whole Conba layers compiled, 512 steps at a time). On CUDA with triton installed,
`+triton` rows prefill through the Triton kernel (`conba_kernel="triton"`; decoding takes the step form).
`--cuda-graphs` adds `+graphs` rows (and `+compile+graphs` with --compile): decoding steps replayed from
CUDA graphs (`capture_decode`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mixcon.benchmarks.common import (
    TokenClock,
    add_device_arguments,
    add_out_argument,
    apply_precision,
    copy_bandwidth_gbs,
    new_figure,
    print_table,
    save_figure,
    stream_read_gbs,
    sync,
    triton_default,
    twins,
    write_results,
)
from mixcon.cli.common import check_cuda_graphs, number_type
from mixcon.config import MixConConfig
from mixcon.generation.cache import MixConCache, cache_nbytes
from mixcon.generation.generate import generation_capacity
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.dtypes import DTYPES


def hf_models(config: MixConConfig) -> dict[str, torch.nn.Module]:
    """transformers' Jamba and Llama at the width and depth of `config` (empty if not installed)."""
    try:
        from transformers import JambaConfig, JambaForCausalLM, LlamaConfig, LlamaForCausalLM
    except ImportError:
        return {}
    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_hidden,
                  num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                  num_key_value_heads=config.n_kv_heads)
    jamba = JambaConfig(**common, num_experts=config.n_experts, num_experts_per_tok=config.top_k,
                        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4,
                        mamba_d_state=16, mamba_expand=2, use_mamba_kernels=False)
    return {"transformers-jamba": JambaForCausalLM(jamba).eval(),
            "transformers-llama": LlamaForCausalLM(LlamaConfig(**common)).eval()}


def time_generation(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int
                    ) -> tuple[float, list[float], int | None]:
    """(prefill seconds, seconds between each later token, bytes of the cache that transformers' `generate`
    returns, None for our models) of one greedy `generate` of `new_tokens` + 1 tokens after the prompt `ids`.

    Each token's arrival is stamped by a streamer: prefill is the time to the first new token.
    """
    clock = TokenClock()
    cache_bytes = None
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        if isinstance(model, MixConForCausalLM):
            model.generate(ids, new_tokens + 1, streamer=clock)
        else:  # transformers also streams the prompt first: stamp it as the start
            out = model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                                 streamer=clock, pad_token_id=0, return_dict_in_generate=True)
            start = clock.stamps.pop(0)
            past = out.past_key_values  # ours (a MixConCache) for a wrapped model, else transformers' own
            cache_bytes = past.nbytes() if isinstance(past, MixConCache) else tensor_bytes(past)
    return clock.stamps[0] - start, [b - a for a, b in itertools.pairwise(clock.stamps)], cache_bytes


def tensor_bytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages that `obj` holds (a transformers cache: its layers' attributes,
    lists, tuples and dicts, a few levels deep)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if depth > 4:
        return 0
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif not isinstance(obj, (list, tuple)):
        obj = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    return sum(tensor_bytes(item, seen, depth + 1) for item in obj)


def weight_bytes_read(model: MixConForCausalLM, dtype: torch.dtype) -> int:
    """Bytes of weights one decoding step reads in `dtype`: the active parameters, of which an embedding table
    that the LM head does not share counts one row (the token's)."""
    n = model.num_parameters(active=True)
    if model.lm_head.weight is not model.embed.weight:
        n -= model.embed.weight.numel() - model.embed.weight.shape[1]
    return n * dtype.itemsize


def _mixcon(model: torch.nn.Module) -> MixConForCausalLM | None:
    """The MixCon model that `model` is or wraps (transformers' wrapper), else None."""
    inner = getattr(model, "model", model)
    return inner if isinstance(inner, MixConForCausalLM) else None


def run(contexts: list[int], hf_max_context: int, new_tokens: int, repeats: int, out_dir: Path | None,
        base: MixConConfig | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
        compiled: bool = False, triton: bool | None = None, via_transformers: bool = False,
        cuda_graphs: bool = False) -> list[dict[str, Any]]:
    """Time every model at every context (transformers' models up to hf_max_context); base: `small`;
    `compiled` adds our models with a compiled decoding step and compiled prefill scans, `triton` (default:
    on CUDA when triton is installed) our models with Conba layers prefilling through the Triton kernel,
    `via_transformers` MixCon (and MixCon+compile) again, wrapped as a transformers model and decoded by
    transformers' `generate` (`mixcon.integrations.transformers`), `cuda_graphs` our models (and their compiled
    variants) decoding from CUDA graphs (`capture_decode`)."""
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device, got device={device!r}")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs(device=device) / 2  # bytes read per second (a copy reads and writes)
    stream = stream_read_gbs(device=device)
    print(f"copy: {bandwidth:.1f} GB/s read (and as many written), stream read: {stream:.1f} GB/s on {device}, "
          f"{torch.get_num_threads()} threads")
    base = base or MixConConfig.preset("small")
    models: dict[str, torch.nn.Module] = {name: MixConForCausalLM(c) for name, c in twins(base).items()}
    if triton is None:
        triton = triton_default(device)
    for name, c in twins(base).items():  # variants with the same weights
        variants = ["compile"] if compiled else []
        variants += ["triton"] if triton and any(m == "conba" for m, _ in c.layout()) else []
        if cuda_graphs:
            variants += ["graphs", "compile+graphs"] if compiled else ["graphs"]
        for variant in variants:
            twin = MixConForCausalLM(c.replace(conba_kernel="triton") if variant == "triton" else c)
            twin.load_state_dict(models[name].state_dict())
            if variant.startswith("compile"):
                twin.compile_decode()
                twin.compile_prefill()
            if variant.endswith("graphs"):
                twin.capture_decode()
            models[f"{name}+{variant}"] = twin
    if via_transformers:
        from mixcon.integrations.transformers import MixConHFForCausalLM

        for name in [n for n in models if n in ("mixcon", "mixcon+compile")]:  # the same modules, wrapped
            models[f"{name} via transformers"] = MixConHFForCausalLM.from_mixcon(models[name])
    models.update(hf_models(base))
    for model in models.values():
        model.to(device=device, dtype=dtype).eval()
    for n in (8, 16):  # a compiled step compiles for the first capacity, then once more with it dynamic
        warm = torch.randint(0, base.vocab_size, (1, n), device=device)
        for model in models.values():
            time_generation(model, warm, 2)
    prompts = {context: torch.randint(0, base.vocab_size, (1, context), device=device) for context in contexts}
    timed_at = {context: {name: model for name, model in models.items()
                          if _mixcon(model) is not None or context <= hf_max_context} for context in contexts}
    prefills: dict[tuple[int, str], list[float]] = {}
    gaps: dict[tuple[int, str], list[float]] = {}
    cache_bytes: dict[tuple[int, str], int | None] = {}

    def row_of(context: int, name: str, model: torch.nn.Module) -> dict[str, Any]:
        """One model's row at one context from its timings so far: medians of the prefills and of all gaps."""
        ours = _mixcon(model)
        prefill, per_token = statistics.median(prefills[context, name]), statistics.median(gaps[context, name])
        row = dict(model=name, context=context, prefill_tok_s=context / prefill, decode_ms=per_token * 1e3,
                   decode_tok_s=1 / per_token, cache_MiB=None, bound_ms=None, stream_bound_ms=None)
        held = cache_bytes[context, name]  # the cache transformers' generate returned, after the last token
        if ours is not None and held is None:  # the cache our generate allocates, all of which decoding reads
            held = cache_nbytes(ours.config, 1, generation_capacity(context, new_tokens + 1), dtype)
        if held is not None:
            row["cache_MiB"] = held / 2**20
        if ours is not None:
            read = weight_bytes_read(ours, dtype) + held
            row["bound_ms"] = read / (bandwidth * 1e9) * 1e3
            row["stream_bound_ms"] = read / (stream * 1e9) * 1e3
        return row

    rows: list[dict[str, Any]] = []
    for round_ in range(repeats):  # rounds over every context, the models in turn within each: a slow phase of
        # the machine hits all models and all contexts alike
        for context, timed in timed_at.items():
            if round_ == 0:
                for model in timed.values():  # warm-up at this length: first-touch of its activations, compiles
                    time_generation(model, prompts[context], 1)
            for name, model in timed.items():
                prefill, later, cache_bytes[context, name] = time_generation(model, prompts[context], new_tokens)
                prefills.setdefault((context, name), []).append(prefill)
                gaps.setdefault((context, name), []).extend(later)
            rows = [row_of(c, name, model) for c, models_at in timed_at.items() for name, model in models_at.items()
                    if (c, name) in prefills]
            if out_dir is not None:  # after each context: an interrupted run keeps what it measured
                payload = dict(device=device, dtype=str(dtype), read_bandwidth_gbs=bandwidth,
                               stream_read_gbs=stream, rows=rows)
                write_results(out_dir, "decode", payload, _plot)
    for context in contexts:
        print_table([r for r in rows if r["context"] == context], list(rows[0]))
        print()
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (lat, mem) = new_figure(2, width=11)
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["context"], r["decode_ms"], r["cache_MiB"]) for r in rows if r["model"] == name)
        lat.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if pts[0][2] is not None:
            mem.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    lat.set(xscale="log", xlabel="context (tokens)", ylabel="ms per decoded token", title="decode latency")
    mem.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB", title="decoding cache")
    for ax in (lat, mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=number_type(int, 1, many=True), default="1024,4096,16384,32768",
                   help="prompt lengths (default: %(default)s)")
    p.add_argument("--hf-max-context", type=number_type(int, 0), default=4096,
                   help="longest prompt for the transformers models (their CPU prefill is slow; 0: none; "
                        "default: %(default)s)")
    p.add_argument("--new-tokens", type=number_type(int, 1), default=32,
                   help="decoded tokens per measurement (default: %(default)s)")
    p.add_argument("--repeats", type=number_type(int, 1), default=2, help="generations per model and context (default: "
                   "%(default)s)")
    add_out_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="also time our models decoding and prefilling through torch.compile "
                        "(compile_decode, compile_prefill)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time our models (and with --compile their compiled variants) decoding from CUDA graphs "
                        "(capture_decode; CUDA devices only)")
    p.add_argument("--via-transformers", action="store_true",
                   help="also time MixCon wrapped as a transformers model, decoded by transformers' generate "
                        "(needs transformers >= 5)")
    add_device_arguments(p)


def main(args: argparse.Namespace, base: MixConConfig | None = None) -> int:
    apply_precision(args)
    check_cuda_graphs("mixcon bench decode", args)
    run(args.contexts, args.hf_max_context, args.new_tokens, args.repeats, args.out, base=base, device=args.device,
        dtype=DTYPES[args.dtype], compiled=args.compile, via_transformers=args.via_transformers,
        cuda_graphs=args.cuda_graphs)
    return 0
