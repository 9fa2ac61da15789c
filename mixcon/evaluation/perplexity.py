"""Perplexity and bits per byte of a MixCon model on documents.

Each document is scored as training sees it: an EOS token, then the document's tokens, every one of which
is predicted from what precedes it. Two ways to bound the compute:

- "window": sliding windows of at most `context` tokens, `stride` apart; each window scores only the tokens
  the previous one did not, so every token is predicted from at least `context - stride` tokens (or all
  before it). Comparable with any causal LM.
- "stream": the whole document in chunks of `context` tokens through the decoding cache, so every token is
  predicted from the whole document before it, exactly as one full forward would, in bounded activation
  memory (Conba layers carry a fixed-size state; attention layers a growing K/V cache).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from mixcon.data.tokenizer import AnyTokenizer
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.cross_entropy import IGNORE, linear_token_scores

MODES = ("window", "stream")


@dataclass(frozen=True)
class TextScore:
    """Summed negative log-likelihood of the scored tokens and what it was summed over."""

    nll: float  # nats
    tokens: int
    bytes: int  # UTF-8 bytes of the documents
    documents: int
    seconds: float

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (nats); nan over no tokens."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0)) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        """Tokenizer-independent: the same text costs the same bits whatever its tokenization; nan over no bytes."""
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0}


def _check_stride(context: int, stride: int) -> None:
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")


def window_spans(n: int, context: int, stride: int, align_last: bool = False) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored) for the windows over `n` predictions: inputs [begin, end) predict their next
    tokens, of which the last `scored` are new (not scored by an earlier window). `align_last`: the last window
    ends at `n` with `context` inputs (lm-eval's rolling windows), not where the stride puts its start."""
    _check_stride(context, stride)
    previous_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        if align_last and end == n:
            begin = max(0, n - context)
        yield begin, end, end - previous_end
        previous_end = end
        if end == n:
            return


def _rows(docs: Sequence[list[int]], mode: str, context: int, stride: int,
          align_last: bool) -> Iterator[tuple[int, list[int], list[int]]]:
    """(document index, inputs, targets) per forward row; IGNORE marks targets scored in another row."""
    for d, ids in enumerate(docs):
        inputs, targets = ids[:-1], ids[1:]
        if mode == "stream":
            yield d, inputs, targets
            continue
        for begin, end, scored in window_spans(len(inputs), context, stride, align_last):
            yield d, inputs[begin:end], [IGNORE] * (end - begin - scored) + targets[end - scored:end]


def right_pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
              device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs padded with `pad_id` and targets padded with IGNORE, both on the right: in a causal
    model a pad never reaches an earlier position."""
    T = max(len(x) for x, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs.to(device), targets.to(device)


def row_scores(model: MixConForCausalLM, hidden: torch.Tensor, targets: torch.Tensor,
               vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (B, T, d) (`return_logits=False`), (B, T) targets (IGNORE = not scored) -> (B,)
    summed negative log-likelihood per row in float64 (computed in fp32, fp64 for an fp64 model) and (B,)
    whether every target is the argmax among the ids below `vocab_limit`; the LM head runs chunk by chunk
    (`ops.linear_token_scores`), so the (B, T, V) logits never exist whole."""
    nll, greedy = linear_token_scores(hidden, model.lm_head.weight, targets, vocab_limit)
    return nll.double().sum(1), greedy.all(1)


def scored_hidden(model: MixConForCausalLM, inputs: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of right-padded rows whose scored targets end each row: the final hidden states from the
    first scored position of any row on, and the targets they predict."""
    keep = inputs.shape[1] - int((targets != IGNORE).int().argmax(1).min())
    return model(inputs, logits_to_keep=keep, return_logits=False).last_hidden_state, targets[:, -keep:]


@torch.no_grad()
def _score_batch(model: MixConForCausalLM, inputs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
                 mode: str, context: int) -> torch.Tensor:
    """(B,) summed NLL of each row's targets; `lengths` (B,) are the rows' unpadded lengths."""
    if mode == "window":
        return row_scores(model, *scored_hidden(model, inputs, targets))[0]
    cache = model.new_cache(inputs.shape[0], max_length=min(inputs.shape[1], 4 * context))
    cache.limit = inputs.shape[1]  # it grows by doubling, to the longest row and no further
    total = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
    rows = torch.arange(inputs.shape[0], device=inputs.device)  # the rows still running
    for begin in range(0, inputs.shape[1], context):
        running = lengths[rows] > begin
        if not bool(running.all()):  # finished documents leave the batch
            cache.select_rows(running.nonzero()[:, 0])
            rows = rows[running]
        end = min(begin + context, int(lengths[rows].max()))
        hidden = model(inputs[rows, begin:end], cache=cache, return_logits=False).last_hidden_state
        total.index_add_(0, rows, row_scores(model, hidden, targets[rows, begin:end])[0])
    return total


def document_nll(model: MixConForCausalLM, docs: Sequence[list[int]], *, pad_id: int, context: int = 1024,
                 stride: int | None = None, mode: str = "window", batch_size: int = 8,
                 progress: bool = False, align_last: bool = False) -> list[float]:
    """Summed negative log-likelihood (nats) of each document's tokens after its first (ids[1:] given what
    precedes them); see the module docstring for the modes. `stride` (window mode; default `context`, i.e.
    disjoint windows) is the step between windows, `align_last` as in `window_spans`; in stream mode
    `context` is the chunk fed at a time.
    `batch_size` rows (windows or documents) run side by side, right-padded with `pad_id`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    if context < 1 or batch_size < 1:
        raise ValueError(f"context={context} and batch_size={batch_size} must be >= 1")
    if mode == "stream" and stride is not None:
        raise ValueError(f"stride={stride}: windows only (mode='window'); mode='stream' scores whole documents")
    stride = context if stride is None else stride
    if mode == "window":
        _check_stride(context, stride)
    if any(len(ids) < 2 for ids in docs):
        raise ValueError("every document needs a first token and at least one token to score")
    rows = sorted(_rows(docs, mode, context, stride, align_last), key=lambda r: len(r[1]), reverse=True)
    device = model.embed.weight.device
    totals = torch.zeros(len(docs), dtype=torch.float64, device=device)
    bar = tqdm(total=sum(len(ids) - 1 for ids in docs), unit="tok", disable=not progress, dynamic_ncols=True)
    with model.evaluating(), bar:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            inputs, targets = right_pad([(x, y) for _, x, y in batch], pad_id, device)
            index = torch.tensor([d for d, _, _ in batch], device=device)
            lengths = torch.tensor([len(x) for _, x, _ in batch], device=device)
            totals.index_add_(0, index, _score_batch(model, inputs, targets, lengths, mode, context))
            bar.update(int((targets != IGNORE).sum()))
    return totals.tolist()


def evaluate_texts(model: MixConForCausalLM, tokenizer: AnyTokenizer, texts: Iterable[str], *,
                   context: int = 1024, stride: int | None = None, mode: str = "window", batch_size: int = 8,
                   progress: bool = False) -> TextScore:
    """Score every non-empty text as one document (an EOS token, then its tokens) with `document_nll`; there must
    be one at least."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("evaluate_texts: no text to score (no texts, or only empty ones)")
    docs = [[tokenizer.eos_id, *tokenizer.encode(t)] for t in texts]
    start = time.perf_counter()
    nll = document_nll(model, docs, pad_id=tokenizer.pad_id, context=context, stride=stride, mode=mode,
                       batch_size=batch_size, progress=progress)
    return TextScore(nll=math.fsum(nll), tokens=sum(len(ids) - 1 for ids in docs),
                     bytes=sum(len(t.encode("utf-8")) for t in texts), documents=len(docs),
                     seconds=time.perf_counter() - start)
