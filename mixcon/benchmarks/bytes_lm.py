"""Byte-level language modelling for the probes that train models briefly (`bench filler`, `bench ablate`):
a corpus as one byte stream, held-out windows from its end, and one config trained and scored on them."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from mixcon.benchmarks import common
from mixcon.cli.common import add_max_bytes_argument, number_type
from mixcon.config import MixConConfig
from mixcon.data.corpus import Corpus
from mixcon.data.shards import encode_documents
from mixcon.data.synthetic import insert_filler
from mixcon.data.tokenizer import ByteTokenizer
from mixcon.evaluation.filler import filler_loss
from mixcon.models.mixcon import MixConForCausalLM

TOKENIZER = ByteTokenizer()


def byte_stream(spec: str | None, max_bytes: int | None, exclude: Iterable[str | os.PathLike | None] = ()
                ) -> torch.Tensor:
    """The corpus's first `max_bytes` (None: all) as one stream of byte ids, each document followed by EOS: (n,) long;
    `exclude`: what the benchmark writes, left out where the corpus holds it."""
    docs = list(Corpus.from_spec(spec, exclude).documents(max_bytes))
    return torch.from_numpy(encode_documents(TOKENIZER, docs, np.dtype(np.int64)))


def stream_settings(stream: torch.Tensor) -> dict[str, Any]:
    """What identifies a byte stream in a benchmark's settings: its length and SHA-256."""
    return dict(bytes=stream.numel(), corpus_sha256=hashlib.sha256(stream.numpy().tobytes()).hexdigest())


def add_arguments(p: argparse.ArgumentParser, window: str) -> None:
    """--corpus, --max-bytes, --real-len (`window` says what it counts), --eval-windows and the training
    arguments (`common.add_training_arguments`)."""
    p.add_argument("--corpus", default=None, help="corpus spec, as for `mixcon train` (default: stdlib sources)")
    add_max_bytes_argument(p, 2_000_000, "use")
    p.add_argument("--real-len", type=number_type(int, 2), default=64, help=f"{window} (default: %(default)s)")
    p.add_argument("--eval-windows", type=number_type(int, 1), default=256,
                   help="held-out windows from the end of the corpus (default: %(default)s)")
    common.add_training_arguments(p, steps=600, batch_size=16, unit="windows")


def split_windows(stream: torch.Tensor, real_len: int, eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream cut in two: the training part (to draw windows from) and `eval_windows` disjoint held-out
    windows (eval_windows, real_len) from its end."""
    held = eval_windows * real_len
    if stream.numel() < 2 * held:
        raise common.UsageError(f"the corpus gives {stream.numel():,} bytes; --eval-windows {eval_windows} x "
                                f"--real-len {real_len} needs at least {2 * held:,} (raise --max-bytes or lower them)")
    return stream[:-held], stream[-held:].view(eval_windows, real_len)


def train_and_score(config: MixConConfig, train: torch.Tensor, held_out: torch.Tensor, *, ratio: float, steps: int,
                    batch_size: int, lr: float, seed: int, device: str) -> dict[str, Any]:
    """Train `config` (with the bytes tokenizer's vocabulary) from the init of `seed` on random windows of
    `train` (the length of `held_out`'s rows) with round(ratio × length) fillers (PAD) inserted, then score the
    next real bytes of `held_out` (fillers placed from seed + 1): train seconds, the mean loss of the last
    20 steps (nats), held-out bits per byte and the parameter counts."""
    real_len = held_out.shape[1]

    def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, train.numel() - real_len + 1, (batch_size,), generator=generator)
        windows = train[starts[:, None] + torch.arange(real_len)]  # (batch_size, real_len)
        return insert_filler(windows, ratio, TOKENIZER.pad_id, generator)

    torch.manual_seed(seed)
    model = MixConForCausalLM(config.replace(vocab_size=TOKENIZER.vocab_size)).to(device)
    start = time.perf_counter()
    losses = common.train_briefly(model, batch, steps=steps, lr=lr, seed=seed)
    seconds = time.perf_counter() - start
    nats = filler_loss(model, held_out, ratio, TOKENIZER.pad_id, seed=seed + 1)
    last = losses[-20:]
    return dict(layout=model.config.layout_string(), params=model.num_parameters(),
                active_params=model.num_parameters(active=True), train_s=seconds,
                final_loss=sum(last) / len(last), bits_per_byte=nats / math.log(2))
