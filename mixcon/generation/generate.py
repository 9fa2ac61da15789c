"""Autoregressive generation: one prefill, then one cached step per token."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

import mixcon
from mixcon.checks import as_integer, as_number, check_attention_mask, is_integer, is_number

if TYPE_CHECKING:
    from mixcon.generation.cache import MixConCache
    from mixcon.models.mixcon import MixConForCausalLM

# Cache room made up front for new tokens (one allocation, one shape for a compiled decoding step); a longer
# generation grows the cache as it goes (`MixConCache.reserve` doubles it, up to the prompt and max_new_tokens),
# so no absurd size is allocated for a generation that ends early.
PREALLOCATED_NEW_TOKENS = 4096


def generation_capacity(prompt_length: int, max_new_tokens: int) -> int:
    """Positions of the cache that `generate` allocates for a prompt: room for it and its new tokens."""
    return prompt_length + min(max_new_tokens, PREALLOCATED_NEW_TOKENS)


def generation_cache(model: MixConForCausalLM, batch_size: int, prompt_length: int, max_new_tokens: int
                     ) -> MixConCache:
    """The cache a generation makes: `generation_capacity` positions, growing no further than the prompt and
    its new tokens."""
    cache = model.new_cache(batch_size, max_length=generation_capacity(prompt_length, max_new_tokens))
    cache.limit = prompt_length + max_new_tokens
    return cache


class Streamer(Protocol):
    """transformers' streamer protocol (`TextStreamer`, `TextIteratorStreamer`)."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  min_p: float | None = None) -> torch.Tensor:
    """(B, V) logits in fp32 over `temperature`, with -inf for the tokens outside the top k, outside the top-p nucleus,
    and below `min_p` times the most likely token's probability (in this order, as transformers' warpers; ties at
    the k-th logit are kept)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits with those of the `seen` (B, V) tokens divided by `penalty` where positive, multiplied where
    negative (CTRL's repetition penalty, as transformers' `repetition_penalty`), in fp32."""
    logits = logits.float()
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample_next(
    logits: torch.Tensor,  # (B, V)
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Greedy argmax, or a sample from `filter_logits`: (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float()
    logits = logits - logits.amax(-1, keepdim=True)  # the largest at 0: finite over any temperature
    probs = filter_logits(logits, temperature, top_k, top_p, min_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_ends_in_tokens(mask: torch.Tensor) -> None:
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: every prompt must end in a real token (the new tokens follow it): pad "
                         "on the left (zeros before the prompt) for generation")


_LIBRARIES = tuple(os.path.dirname(module.__file__) + os.sep for module in (mixcon, torch))


def _warn_caller(message: str) -> None:
    """A UserWarning shown at the first caller outside mixcon and torch (the line that called generate)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


@torch.no_grad()
def generate(
    model: MixConForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: Callable[[torch.Tensor], None] | Streamer | None = None,
    vocab_limit: int | None = None,
    stopping_criteria: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | bool] | None = None,
) -> torch.Tensor:
    """Continue (B, T) prompts by up to `max_new_tokens` (or to `max_length` tokens in all, prompt included, as
    in transformers; `max_new_tokens` wins when both are given); returns (B, T + generated).

    Prompts of different lengths are left-padded with `attention_mask` (0 = pad): pads never reach
    the Conba states nor attention keys, so each row's logits equal its prompt's generated alone (greedy
    decoding gives the same tokens; sampling draws every row from one generator). Rows that produced
    `eos_token_id` (one id or a list; default: the config's) are continued with `pad_token_id` (default: the
    config's, else the first EOS id). Sampling filters as transformers' warpers do: temperature, then top-k,
    then top-p, then min-p (`min_p`: tokens less likely than min_p times the most likely one are dropped).
    `repetition_penalty` (> 0; None or 1: none) divides the positive logits and multiplies the negative ones of every
    token already in the row (its prompt's real tokens and the new ones), before greedy or sampled choice, as
    transformers' `repetition_penalty` does. `streamer` is called with each step's new tokens (B,); a transformers
    streamer (`TextStreamer`, `TextIteratorStreamer`: `put`/`end`) is given the prompt, each step's tokens and
    `end()`, as transformers' `generate` does. `vocab_limit`: only ids below it are chosen (a tokenizer with fewer ids
    than the model's vocabulary, which could not decode the others). `stopping_criteria(sequences, None)`,
    called after each step with the (B, T + generated) sequences so far, returns which rows are done (a (B,)
    bool tensor, or one bool for all; transformers' `StoppingCriteria` fit): they are continued as after EOS.
    """
    max_new_tokens, max_length, top_k, vocab_limit, pad_token_id, seed = (
        as_integer(v) for v in (max_new_tokens, max_length, top_k, vocab_limit, pad_token_id, seed))
    temperature, top_p, min_p, repetition_penalty = (as_number(v) for v in (temperature, top_p, min_p,
                                                                             repetition_penalty))
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must be a tensor of integer token ids, got "
                        f"{input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor (1 = token, 0 = pad), got {type(attention_mask).__name__}")
    if do_sample not in (True, False):
        raise ValueError(f"do_sample={do_sample!r} must be True or False")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if max_new_tokens is None:
        if max_length is None:
            raise ValueError("generate needs max_new_tokens (or max_length: prompt and new tokens together)")
        if not (is_integer(max_length) and max_length >= 0):
            raise ValueError(f"max_length={max_length!r} must be an integer >= 0")
        if max_length <= input_ids.shape[-1]:
            _warn_caller(f"max_length={max_length} leaves no room after the prompt's {input_ids.shape[-1]} tokens: "
                         "nothing is generated (give max_new_tokens, the new tokens alone)")
        max_new_tokens = max(0, max_length - input_ids.shape[-1])
    elif max_length is not None:
        _warn_caller(f"max_new_tokens={max_new_tokens} and max_length={max_length} both given: max_new_tokens wins, "
                     "as in transformers")
    if not (is_integer(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if do_sample and not (is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 when sampling (use do_sample=False "
                         "for greedy)")
    if top_k is not None and not (is_integer(top_k) and top_k >= 0):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 0 (0 and None: no top-k filter)")
    top_k = top_k or None
    if vocab_limit is not None and not (is_integer(vocab_limit) and 1 <= vocab_limit <= model.config.vocab_size):
        raise ValueError(f"vocab_limit={vocab_limit!r} must be None or an integer in [1, vocab_size="
                         f"{model.config.vocab_size}]")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")
    if min_p is not None and not (is_number(min_p) and 0 <= min_p <= 1):
        raise ValueError(f"min_p={min_p!r} must be None or a number in [0, 1] (0 and None: no min-p filter)")
    if repetition_penalty is not None and not (is_number(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be None or a finite number > 0 (1 and None: "
                         "no penalty)")
    if input_ids.dim() == 1:  # one prompt (and its mask)
        input_ids = input_ids[None]
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be (T,) or (B, T) with B, T >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is not None:
        check_attention_mask(attention_mask, tuple(input_ids.shape))
        _check_ends_in_tokens(attention_mask)
    if generator is not None and seed is not None:
        raise ValueError("seed and generator: give one (seed makes a generator)")
    if seed is not None and not (is_integer(seed) and -(2**63) <= seed < 2**64):
        raise ValueError(f"seed={seed!r} must be None or an integer in [-2**63, 2**64) (torch.manual_seed's)")
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if isinstance(eos_token_id, torch.Tensor):  # as transformers' generation configs may hold them
        eos_token_id = eos_token_id.tolist()
    eos_ids = [as_integer(e) for e in (eos_token_id if isinstance(eos_token_id, list | tuple) else [eos_token_id])]
    V = model.config.vocab_size
    for name, value in [*(("eos_token_id", e) for e in eos_ids), ("pad_token_id", pad_token_id)]:
        if value is not None and not (is_integer(value) and 0 <= value < V):
            raise ValueError(f"{name}={value!r} must be None or an integer in [0, vocab_size={V})")
    eos_ids = [e for e in eos_ids if e is not None]
    fill = pad_token_id if pad_token_id is not None else eos_ids[0] if eos_ids else None
    if stopping_criteria is not None and fill is None:
        raise ValueError("stopping_criteria: rows that stop are continued with pad_token_id (or the EOS id), and "
                         "neither is given nor in the model's config")
    eos = torch.tensor(eos_ids, device=input_ids.device)
    hf_streamer = streamer is not None and not callable(streamer)
    if hf_streamer:  # transformers' protocol: the prompt first, then each step's tokens, then end()
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must be called with each step's tokens, or be a transformers streamer (put "
                            f"and end), got {type(streamer).__name__}")
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        model.check_inputs(input_ids, None, attention_mask, None, None)  # what the prefill would have checked
        if hf_streamer:
            streamer.end()
        return input_ids.clone()
    with model.evaluating():
        B, T = input_ids.shape
        cache = generation_cache(model, B, T, max_new_tokens)
        logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
        V = vocab_limit or V
        seen = None
        if repetition_penalty not in (None, 1):  # (B, V + 1): the prompt's real tokens; pads go to the last column
            real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=input_ids.device)
            seen = seen.scatter_(1, real.clamp(max=V), True)[:, :V]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new_tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            logits = logits[:, :V] if seen is None else penalize_repeats(logits[:, :V], seen, repetition_penalty)
            token = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator, min_p=min_p)
            if fill is not None:
                token = token.masked_fill(finished, fill)
            if eos_ids:
                finished |= torch.isin(token, eos)
            new_tokens.append(token)
            if seen is not None:  # only a finished row's fill may lie at or above vocab_limit (its penalty no longer
                seen.scatter_(1, token.clamp(max=V - 1)[:, None], True)  # matters)
            if stopping_criteria is not None:
                done = stopping_criteria(torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1), None)
                done = torch.as_tensor(done, dtype=torch.bool, device=finished.device)
                if done.shape not in ((), (B,)):
                    raise ValueError(f"stopping_criteria must return one bool or a (B,) = ({B},) bool tensor of the "
                                     f"rows that are done, got shape {tuple(done.shape)}")
                finished |= done
            if hf_streamer:
                streamer.put(token.cpu())
            elif streamer is not None:
                streamer(token)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            with torch.inference_mode():  # the step's few hundred small ops dispatch faster (docs/benchmarks.md §35)
                logits = model(token[:, None], cache=cache).logits[:, -1]
    if hf_streamer:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
