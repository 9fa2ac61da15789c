"""MixCon models in EleutherAI's `lm-eval` harness (`pip install mixcon[eval]`).

Importing this module registers the model type "mixcon", so that
`lm_eval.simple_evaluate(model="mixcon", model_args="pretrained=runs/small", tasks=[...])` works, as does
`simple_evaluate(model=MixConLM(...))`; `mixcon eval tasks` is the command line. Every context starts with
an EOS token, as every training document does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from mixcon.data.tokenizer import AnyTokenizer, load_tokenizer
from mixcon.evaluation.perplexity import IGNORE, document_nll, right_pad, row_scores, scored_hidden
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.dtypes import resolve_dtype
from mixcon.training.checkpoint import load_model_and_tokenizer

Request = tuple[tuple[str, str], list[int], list[int]]  # (context, continuation), their token ids


@register_model("mixcon")
class MixConLM(TemplateLM):
    """`lm-eval`'s LM interface over a MixCon model: log-likelihoods (exact: no truncation unless
    `max_length` is given; rolling ones stream each document through the cache `context` tokens at a time)
    and greedy or sampled generation with stop strings."""

    def __init__(self, pretrained: str | MixConForCausalLM, tokenizer: str | AnyTokenizer | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str | None = 8,
                 max_length: int | str | None = None, context: int | str = 1024, compile: bool | str = False,
                 max_batch_size: int | None = None, seed: int | str = 0, cuda_graphs: bool | str = False) -> None:
        """`pretrained`: a model, or a run / checkpoint / `save_pretrained` directory; `tokenizer`: a tokenizer,
        'bytes' or a path (default for a directory: its own); `dtype`: fp32, bf16, fp16 or a torch name
        ("bfloat16"; "auto" or default: as loaded); `batch_size` "auto" (or lm-eval's "auto:N") means 8 and
        `max_batch_size` (lm-eval passes it) is not used; `max_length`: the last tokens each input keeps, the
        new ones included when generating; `seed`: of sampled generations (a task's own `seed` generation
        argument wins); `compile`: prefill through compiled Conba layers (`compile_prefill`); `cuda_graphs`:
        generation steps replayed from CUDA graphs (`capture_decode`; on CUDA)."""
        super().__init__()
        if isinstance(pretrained, MixConForCausalLM):
            if tokenizer is None:
                raise ValueError("MixConLM: give the tokenizer of a model passed as an object")
            self.model = pretrained
            self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        else:
            if tokenizer is not None and not isinstance(tokenizer, str):
                raise ValueError("MixConLM: with pretrained=PATH, tokenizer must be None, 'bytes' or a path")
            self.model, self.tok = load_model_and_tokenizer(pretrained, device or "cpu", tokenizer)
        try:
            torch_dtype = resolve_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"MixConLM: {e} (default: as loaded)") from None
        self.model.to(device=device, dtype=torch_dtype).eval()
        auto = batch_size is None or (isinstance(batch_size, str) and batch_size.split(":")[0] == "auto")
        self.batch_size = _positive_int("batch_size", 8 if auto else batch_size)
        self.max_length = None if max_length in (None, "None", "") else _positive_int("max_length", max_length)
        self.context = _positive_int("context", context)
        try:
            self.seed = int(seed)
        except (TypeError, ValueError):
            raise ValueError(f"MixConLM: seed={seed!r} must be an integer") from None
        if _flag(compile):
            self.model.compile_prefill()
        if _flag(cuda_graphs):
            self.model.capture_decode()

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def vocab_limit(self) -> int:
        """Ids below this are the ones greedy generation may choose: those of both model and tokenizer."""
        return min(self.tok.vocab_size, self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would produce it) per request.
        Continuations of one context (multiple choice) share one prefill of it, branched in the cache."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation is certain
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if continuation:
                groups.setdefault(tuple(self._with_eos(context)), []).append(i)
        shared = {prefix: members for prefix, members in groups.items()
                  if len(members) > 1 and self.max_length is None}
        alone = sorted((i for prefix, members in groups.items() if prefix not in shared for i in members),
                       key=lambda i: len(requests[i][1]) + len(requests[i][2]), reverse=True)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for prefix, members in shared.items():
                self._record(requests, results, members,
                             self._score_shared(list(prefix), [requests[i][2] for i in members]))
                bar.update(len(members))
            for start in range(0, len(alone), self.batch_size):
                batch = alone[start:start + self.batch_size]
                self._record(requests, results, batch, self._score([self._row(*requests[i][1:]) for i in batch]))
                bar.update(len(batch))
        return results

    def _record(self, requests: list[Request], results: list[tuple[float, bool]], batch: list[int],
                scores: list[tuple[float, bool]]) -> None:
        for i, result in zip(batch, scores, strict=True):
            results[i] = result
            self.cache_hook.add_partial("loglikelihood", requests[i][0], result)

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Inputs and targets (IGNORE where not scored) of one request."""
        prefix = self._with_eos(context)
        inputs, targets = (prefix + continuation)[:-1], [IGNORE] * (len(prefix) - 1) + continuation
        if self.max_length is not None:  # keep the last max_length predictions
            if len(continuation) > self.max_length:
                raise ValueError(f"MixConLM: a continuation of {len(continuation)} tokens is longer than "
                                 f"max_length={self.max_length}; it could only be scored in part")
            inputs, targets = inputs[-self.max_length:], targets[-self.max_length:]
        return inputs, targets

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return self._logprob_greedy(*scored_hidden(self.model, *right_pad(rows, self.tok.pad_id, self.device)))

    @torch.no_grad()
    def _score_shared(self, prefix: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Prefill `prefix` once, then score its continuations `batch_size` at a time side by side, each
        batch in its own branch of the prefilled cache (one row per continuation)."""
        cache = self.model.new_cache(1, max_length=len(prefix) + max(len(c) for c in continuations))
        first = self.model(torch.tensor([prefix], device=self.device), cache=cache, logits_to_keep=1,
                           return_logits=False).last_hidden_state
        scores: list[tuple[float, bool]] = []
        for start in range(0, len(continuations), self.batch_size):
            batch = continuations[start:start + self.batch_size]
            hidden = first.expand(len(batch), -1, -1)  # (n, 1, d): predicts each continuation's first token
            targets = torch.tensor([[c[0]] for c in batch], device=self.device)
            if max(len(c) for c in batch) > 1:
                branch = cache.branch(torch.zeros(len(batch), dtype=torch.long, device=self.device))
                inputs, rest = right_pad([(c[:-1], c[1:]) for c in batch], self.tok.pad_id, self.device)
                hidden = torch.cat([hidden, self.model(inputs, cache=branch, return_logits=False).last_hidden_state],
                                   1)
                targets = torch.cat([targets, rest], 1)
            scores += self._logprob_greedy(hidden, targets)
        return scores

    def _logprob_greedy(self, hidden: torch.Tensor, targets: torch.Tensor) -> list[tuple[float, bool]]:
        """Per row of final hidden states (B, T, d) and (B, T) targets (IGNORE = not scored): the targets' summed
        log-probability and whether each is the argmax among the ids below `vocab_limit` (those greedy
        generation may choose: the tokenizer's)."""
        nll, greedy = row_scores(self.model, hidden, targets, self.vocab_limit)
        return [(-n, g) for n, g in zip(nll.tolist(), greedy.tolist(), strict=True)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string after an EOS token: streamed through the cache (exact), or, when
        `max_length` is set, in lm-eval's rolling windows of `max_length` tokens (disjoint predictions; the last
        window ends with the string and has a full window of inputs)."""
        docs = [[self.eot_token_id, *self.tok_encode(req.args[0])] for req in requests]
        scored = [i for i, ids in enumerate(docs) if len(ids) > 1]
        mode, context = ("stream", self.context) if self.max_length is None else ("window", self.max_length)
        nll = document_nll(self.model, [docs[i] for i in scored], pad_id=self.tok.pad_id, context=context,
                           mode=mode, batch_size=self.batch_size, progress=not disable_tqdm, align_last=True)
        out = [0.0] * len(docs)  # an empty string has probability 1
        for i, value in zip(scored, nll, strict=True):
            out[i] = -value
            self.cache_hook.add_partial("loglikelihood_rolling", (requests[i].args[0],), -value)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings (cut there), EOS or `max_gen_toks`.
        Requests with the same generation arguments run `batch_size` at a time, left-padded (greedy results
        equal one request at a time; sampled ones depend on the batch). Sampling draws from one generator per
        call and group of generation arguments, seeded by their `seed` or the model's: repeated requests
        (a task's `repeats`) get samples of their own."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for indices in groups.values():
                options = _generation_options(dict(requests[indices[0]].args[1]))
                seed = options.pop("seed", None)
                if options.get("do_sample"):
                    options["generator"] = torch.Generator(self.device).manual_seed(self.seed if seed is None else seed)
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    for i, text in zip(batch, self._generate([requests[i].args[0] for i in batch], **options),
                                       strict=True):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return out

    def _generate(self, contexts: list[str], until: list[str], max_new_tokens: int,
                  **sampling: Any) -> list[str]:
        prompts = [self._with_eos(self.tok_encode(c)) for c in contexts]
        if self.max_length is not None:  # room for the new tokens within max_length, as lm-eval's HF model keeps
            room = self.max_length - max_new_tokens
            if room < 1:
                raise ValueError(f"MixConLM: max_length={self.max_length} leaves no room for a prompt before "
                                 f"{max_new_tokens} new tokens (the task's max_gen_toks): raise max_length")
            prompts = [p[-room:] for p in prompts]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, T - len(p):], mask[row, T - len(p):] = torch.tensor(p), 1
        stops = [stop for stop in until if stop]
        stopping = StopStrings(self.tok_decode, stops, T, self.tok.token_bytes()) if stops else None
        generated = self.model.generate(ids.to(self.device), max_new_tokens, attention_mask=mask.to(self.device),
                                        eos_token_id=self.eot_token_id, vocab_limit=self.vocab_limit,
                                        stopping_criteria=stopping, **sampling)[:, T:].tolist()
        texts = []
        for tokens in generated:
            if self.eot_token_id in tokens:
                tokens = tokens[:tokens.index(self.eot_token_id)]
            text = self.tok_decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            texts.append(text)
        return texts

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids[:1] == [self.eot_token_id] else [self.eot_token_id, *ids]


class StopStrings:
    """`generate`'s stopping_criteria: a row is done once the text it generated after `prompt_length` holds one
    of `stops` (the text `generate_until` then cuts at the first of them). Each step decodes, for the rows not
    yet done, only the newest token and the tokens before it that hold the longest stop's UTF-8 bytes but one
    (`token_bytes`: the bytes each id stands for, 0 for a special token); a cut inside a character decodes as
    U+FFFD before the text, so only stops that spell U+FFFD themselves need the whole text."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], prompt_length: int,
                 token_bytes: list[int]) -> None:
        self.decode, self.stops, self.start, self.token_bytes = decode, stops, prompt_length, token_bytes
        self.tail = None if any("\ufffd" in stop for stop in stops) else max(len(stop.encode()) for stop in stops)
        self.done: list[bool] | None = None

    def _window(self, tokens: list[int]) -> list[int]:
        """The last tokens in which a stop ending in the newest one can lie."""
        if self.tail is None:
            return tokens
        held = 0
        for i in range(len(tokens) - 2, -1, -1):
            if held >= self.tail - 1:
                return tokens[i + 1:]
            held += self.token_bytes[tokens[i]]
        return tokens

    def __call__(self, sequences: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        new = sequences[:, self.start:]
        if self.done is None:
            self.done = [False] * new.shape[0]
        for row, tokens in enumerate(new):
            if not self.done[row]:
                text = self.decode(self._window(tokens.tolist()))
                self.done[row] = any(stop in text for stop in self.stops)
        return torch.tensor(self.done)


def _flag(value: bool | str) -> bool:
    """A switch of lm-eval's model_args: True, or the text "True" / "true"."""
    return value in (True, "True", "true")


def _positive_int(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"MixConLM: {name}={value!r} must be a positive integer")
    return number


TOKEN_BUDGET_NAMES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's order


def _generation_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's generation arguments as `_generate`'s: stop strings, token budget, sampling, repetition penalty."""
    until = kwargs.pop("until", None) or []
    budgets = [kwargs.pop(name, None) for name in TOKEN_BUDGET_NAMES]  # every alias is popped; the first given wins
    options: dict[str, Any] = {"until": [until] if isinstance(until, str) else list(until),
                               "max_new_tokens": int(next((b for b in budgets if b is not None), 256))}
    temperature = float(kwargs.pop("temperature", 0.0))
    if bool(kwargs.pop("do_sample", temperature > 0)) and temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_k=kwargs.pop("top_k", None),
                       top_p=kwargs.pop("top_p", None), min_p=kwargs.pop("min_p", None),
                       seed=None if kwargs.get("seed") is None else int(kwargs.pop("seed")))
    if kwargs.get("repetition_penalty") is not None:  # greedy or sampled
        options["repetition_penalty"] = float(kwargs.pop("repetition_penalty"))
    if unused := sorted(set(kwargs) - {"top_k", "top_p", "min_p", "seed", "repetition_penalty"}):
        warnings.warn(f"MixConLM.generate_until ignores the generation arguments {unused}", stacklevel=3)
    return options
