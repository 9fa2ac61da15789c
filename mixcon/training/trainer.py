"""The training loop: gradient accumulation, clipping, mixed precision, periodic validation and checkpoints,
a non-finite-loss guard, clean stops on SIGINT/SIGTERM or a time budget, and exact resumption."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mixcon.checks import is_integer, is_number
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.cross_entropy import IGNORE
from mixcon.training import checkpoint as ckpt
from mixcon.training.distributed import (
    DistEnv,
    Parallelism,
    all_reduce,
    barrier,
    clip_grad_norm,
    full_state,
    gather_objects,
    gradient_sync,
    load_full_state,
    parallelize,
    tied_aliases,
)
from mixcon.training.metrics import PLOT_FILE, MetricsLogger
from mixcon.training.optim import build_optimizer, lr_at, set_lr

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), each (B, T) int64


class StatefulLoader(Protocol):
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; nothing of that step was applied or saved."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None) -> None:
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        super().__init__(f"non-finite {what} ({value}) at step {step}; training stopped before applying it, "
                         f"{kept}")
        self.step, self.last_checkpoint = step, last_checkpoint


@dataclass
class TrainOptions:
    """Everything that defines a training run besides the model config (saved in every checkpoint)."""

    # schedule and batch
    steps: int | None = None  # optimizer steps; None: as many as the time budget allows
    time_budget: float | None = None  # seconds for the whole command (the CLI turns it into a deadline)
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # sequences per forward pass per process; None: batch_size / world size
    seq_len: int = 256
    # optimizer
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    # observation and checkpoints
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 1
    # engine
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    parallel: Parallelism = "ddp"
    activation_checkpointing: bool = False
    compile: bool = False
    document_mask: bool = False  # documents in a row do not see each other (each starts at its EOS)
    # data (used by the CLI to rebuild the same data on --resume)
    corpus: str | None = None
    max_bytes: int | None = 4_000_000
    tokenizer: str = "bpe"
    val_fraction: float = 0.01

    def check(self, world_size: int = 1) -> None:
        """Raise ValueError naming the first option out of its range, or whose batch `world_size` processes
        cannot share."""
        def need(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"TrainOptions.{name}={getattr(self, name)!r} must be {allowed}")

        for name in ("batch_size", "seq_len", "eval_every", "save_every", "log_every", "eval_batches"):
            need(name, is_integer(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        for name in ("warmup_steps", "keep_last", "seed"):
            need(name, is_integer(getattr(self, name)) and getattr(self, name) >= 0, "an integer >= 0")
        for name, what in (("steps", "None to fill the time budget"), ("micro_batch_size", "None for batch_size / "
                           "world size"), ("max_bytes", "None for the whole corpus")):
            value = getattr(self, name)
            need(name, value is None or (is_integer(value) and value >= 1), f"an integer >= 1 (or {what})")
        need("time_budget", self.time_budget is None or (is_number(self.time_budget) and self.time_budget > 0),
             "> 0 seconds (or None)")
        for name in ("lr", "weight_decay", "grad_clip"):
            need(name, is_number(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        need("min_lr_ratio", is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        for name in ("beta1", "beta2"):
            need(name, is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1, "in [0, 1)")
        need("val_fraction", is_number(self.val_fraction) and 0 <= self.val_fraction < 1, "in [0, 1)")
        need("precision", self.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'")
        need("parallel", self.parallel in ("ddp", "fsdp"), "'ddp' or 'fsdp'")
        need("batch_size", self.batch_size % world_size == 0, f"divisible by the world size {world_size}")
        local = self.batch_size // world_size
        need("micro_batch_size", self.micro_batch_size is None or local % self.micro_batch_size == 0,
             f"a divisor of the per-process batch (batch_size / world size = {local})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunSummary:
    """What `Trainer.fit` did: steps and tokens (in all, and of this fit), why it stopped, the last losses, and
    where its checkpoint, plot and metrics are."""

    steps: int
    tokens: int
    wall_time: float
    tokens_per_s: float | None  # None when no step was timed (a run's first is not)
    stopped_by: str
    train_loss: float | None
    val_step: int | None
    val_loss: float | None
    val_ppl: float | None
    val_bpb: float | None
    checkpoint: Path | None
    plot: Path | None
    metrics: Path | None
    new_steps: int  # of `steps`, those this fit trained (the others before a resume)
    new_tokens: int  # of `tokens`, those of the new steps

    def format(self) -> str:
        this_fit = (f"{self.new_steps} step{'s' * (self.new_steps != 1)}, {self.new_tokens:,} tokens in "
                    f"{self.wall_time:.0f} s")
        if self.new_steps == self.steps:
            lines = [f"stopped by {self.stopped_by} after {this_fit}"]
        else:
            lines = [f"stopped by {self.stopped_by} at step {self.steps}: {this_fit} (resumed at step "
                     f"{self.steps - self.new_steps}; {self.tokens:,} tokens in all)"]
        lines.append(f"training throughput {self.tokens_per_s:,.0f} tokens/s (the first step, validation and "
                     "checkpoints left out)" if self.tokens_per_s is not None else
                     "training throughput not timed: the first step after a start or resume is not")
        if self.train_loss is not None:
            lines.append(f"train loss {self.train_loss:.4f}")
        if self.val_loss is not None:
            bpb = f", {self.val_bpb:.4f} bits per byte" if self.val_bpb is not None else ""
            lines.append(f"validation (step {self.val_step}): loss {self.val_loss:.4f}, "
                         f"perplexity {self.val_ppl:.2f}{bpb}")
        return "\n".join(lines)


def nothing_left(steps: int | None, step: int, last_val: dict[str, Any]) -> bool:
    """Whether a run resumed at `step`, with the trainer state's `last_val` ({} for a run without validation), has
    nothing left to do for `steps`: it is past them, or at them with their final validation done (a run stopped
    between the loop's checkpoint of its last step and the one after the final validation still has that left;
    a run that validates at all holds a `last_val`: step 0 is validated)."""
    return steps is not None and step >= steps and not (step == steps and bool(last_val)
                                                        and last_val.get("step") != step)


def _process_seed(seed: int, rank: int) -> int:
    """Process `rank`'s seed from the run's: within what torch.manual_seed takes (a seed near 2**64 plus a rank
    would overflow it)."""
    return (seed + rank) % 2**64


class Trainer:
    """Trains `model` on batches from `loader` and writes checkpoints, metrics and plots into `run_dir`.

    `loader` yields global batches (batch_size sequences); process r of W trains on rows [r·B/W, (r+1)·B/W),
    so any world size sees the same data, and a run continues at another world size on the same data: exactly
    when the micro-batch size stays the same (the router's load-balancing loss is a mean per micro-batch, and
    by default a micro-batch is a process's share of the batch) and no training noise is on. `eval_data()`
    yields validation batches; `token_bytes` (V,), the UTF-8 bytes of text each token id stands for (a
    tokenizer's `token_bytes()`), turns the validation loss into bits per byte of the text scored.
    Only rank 0 logs and writes.
    """

    def __init__(
        self,
        model: MixConForCausalLM,
        options: TrainOptions,
        run_dir: str | Path,
        *,
        loader: StatefulLoader,
        eval_data: Callable[[], Iterable[Batch]] | None = None,
        token_bytes: Sequence[int] | None = None,
        tokenizer: ckpt.SavableTokenizer | None = None,
        env: DistEnv | None = None,
        progress: bool = True,
        tensorboard: bool = False,
    ) -> None:
        self.env = env or DistEnv()
        if dist.is_initialized() and dist.get_world_size() != self.env.world_size:  # each would train the whole batch
            raise ValueError(f"Trainer: a process group of {dist.get_world_size()} processes is initialised, but "
                             f"env has world_size={self.env.world_size}; pass env=init_distributed() (as `mixcon "
                             "train` does)")
        options.check(self.env.world_size)
        self.local_batch = options.batch_size // self.env.world_size
        self.micro = options.micro_batch_size or self.local_batch
        if options.document_mask and model.config.eos_token_id is None:
            raise ValueError("TrainOptions.document_mask needs the model config's eos_token_id (documents are "
                             "separated by EOS)")
        self.model, self.options, self.run_dir = model, options, Path(run_dir)
        self.loader, self.eval_data = loader, eval_data
        self.token_bytes = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.float64,
                                                                            device=self.env.device)
        self.tokenizer, self.progress, self.tensorboard = tokenizer, progress, tensorboard
        self.aliases = tied_aliases(model)
        self.shapes = {k: v.shape for k, v in model.state_dict().items() if k not in self.aliases}
        self.module = parallelize(model, self.env, mode=options.parallel,
                                  activation_checkpointing=options.activation_checkpointing, compile=options.compile)
        self.optimizer = build_optimizer(model, lr=options.lr, weight_decay=options.weight_decay,
                                         betas=(options.beta1, options.beta2))
        self.step = 0
        self.tokens = 0
        self.total_steps = options.steps
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.last_val: dict[str, float] = {}
        self._signal: int | None = None
        self._refit_pending = False  # a resumed run fits its schedule to this fit's deadline
        self._eval_seconds: float | None = None  # a validation's duration: measured, or the resumed run's

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything besides model and optimizer that a resumed run needs (a collective: gathers RNG states)."""
        rng = {"torch": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        return {"step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
                "loader": self.loader.state_dict(), "rng": gather_objects(rng), "world_size": self.env.world_size,
                "options": dataclasses.asdict(self.options), "last_val": self.last_val,
                "eval_seconds": self._eval_seconds}

    def save(self) -> Path:
        """Write a checkpoint of the current step (all ranks take part; rank 0 writes)."""
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.aliases)
        state = self.state_dict()
        if self.env.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(
                self.run_dir, self.step, config=self.model.config, model_state=model_state,
                optimizer_state=optimizer_state, trainer_state=state, tokenizer=self.tokenizer,
                keep_last=self.options.keep_last)
        else:
            self.last_checkpoint = ckpt.checkpoint_path(self.run_dir, self.step)
        self.saved_step = self.step
        return self.last_checkpoint

    def resume(self, path: str | Path, config_changes: bool = False) -> None:
        """Continue from a checkpoint (or a run directory's latest): weights, optimizer state, schedule, data
        position, RNG. The optimizer's settings (weight decay, betas, eps) are this run's options. Refuses
        corrupt checkpoints and those of another tokenizer, or of another config unless `config_changes` (the
        model's config may then differ in fields that keep every weight's name and shape)."""
        c = ckpt.load_checkpoint(path, expected_config=None if config_changes else self.model.config,
                                 expected_tokenizer=self.tokenizer)
        ckpt.check_model_state(c.model_state, self.shapes, c.path)
        # (the learning rate stays the checkpoint's: the schedule's at its step, until the next step sets it)
        settings = [{k: v for k, v in group.items() if k not in ("params", "lr")}
                    for group in self.optimizer.param_groups]
        load_full_state(self.model, self.optimizer, c.model_state, c.optimizer_state, self.aliases)
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)  # (loading the state put back the saved run's settings with it)
        s = c.trainer_state
        self.step, self.tokens, self.last_val = s["step"], s["tokens"], s["last_val"]
        self._eval_seconds = s.get("eval_seconds")  # (a time budget keeps it for the final validation)
        if self.options.steps is None:  # keep the schedule length the interrupted run settled on
            self.total_steps = s["total_steps"]
        self.loader.load_state_dict(s["loader"])
        if s["world_size"] == self.env.world_size:
            rng = s["rng"][self.env.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        else:  # another world size: per-process RNG streams (only training noise uses them) are new
            torch.manual_seed(_process_seed(self.options.seed + 7919 * self.step, self.env.rank))
        self.last_checkpoint, self.saved_step = c.path, self.step

    def _clear_later_checkpoints(self, discard: bool, resumed: Path | None) -> None:
        """Delete (`discard`) or refuse the run directory's checkpoints that this run replaces (`replaced_checkpoints`
        of the `resumed` one): left there, they would stay the run's latest and keep_last would prune the new ones
        first."""
        later = ckpt.replaced_checkpoints(self.run_dir, resumed)
        if not later:
            return
        if not discard:
            names = ckpt.checkpoint_names(later)
            where = f" after step {self.step}" if resumed is not None and ckpt.in_run(resumed, self.run_dir) else ""
            raise ValueError(f"{self.run_dir} holds checkpoints{where} ({names}) of the run this one would "
                             "replace; discard them (discard_later=True; mixcon train --overwrite) or use another "
                             "run directory")
        barrier()  # every process has listed them before rank 0 deletes them
        if self.env.is_main:
            for path in later:
                ckpt.delete_checkpoint(path)

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> Any:
        p = self.options.precision
        if p == "bf16" or (p == "auto" and self.env.device.type == "cuda"):
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _local_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.tensor_split(self.env.world_size)[self.env.rank].to(self.env.device, non_blocking=True)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The loss forward (the fused head) of rows x (B, T) with targets y; with `document_mask`, each
        EOS starts a document that sees nothing before it, as evaluation scores documents (EOS, then text)."""
        seq_idx = (x == self.model.config.eos_token_id).cumsum(1) if self.options.document_mask else None
        return self.module(x, labels=y, return_logits=False, seq_idx=seq_idx)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over one global batch; returns its metrics (identical on every rank)."""
        input_ids, labels = next(self.loader)
        if input_ids.shape[0] != self.options.batch_size:
            raise ValueError(f"the loader gave a batch of {input_ids.shape[0]} sequences, "
                             f"expected batch_size={self.options.batch_size}")
        x, y = self._local_rows(input_ids), self._local_rows(labels)
        accum, world = self.local_batch // self.micro, self.env.world_size
        # The language-model loss is the mean over the global batch's scored tokens, whichever micro-batch and
        # process holds them: each micro-batch's mean is weighted by its share of them (times the world size,
        # which DDP's and FSDP's averaging of gradients divides out). Router losses: the mean of micro-batches.
        scored = (labels != IGNORE).flatten(1).sum(1)  # (B,) counted on the host: no device sync per micro-batch
        n_global = int(scored.sum())  # the global batch: the same on every process
        local = scored.tensor_split(world)[self.env.rank].view(accum, self.micro).sum(1).tolist()  # per micro-batch
        sums = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # this process's lm nats, router, aux
        counts = None
        for i, n in enumerate(local):
            rows = slice(i * self.micro, (i + 1) * self.micro)
            with gradient_sync(self.module, i == accum - 1):
                with self._autocast():
                    out = self._forward(x[rows], y[rows])
                lm = out.lm_loss if n else out.lm_loss.nan_to_num(nan=0.0)  # nothing scored: only router losses
                (lm * (n * world / max(n_global, 1)) + out.router_loss / accum).backward()
            sums += torch.stack([lm.detach() * n, out.router_loss.detach() / accum, out.aux_loss.detach() / accum])
            if out.expert_counts is not None:
                counts = out.expert_counts.detach() + (0 if counts is None else counts)
        lm_sum, router, aux_sum = all_reduce(sums, "sum").tolist()
        aux_loss, router = aux_sum / world, router / world
        lm_loss = lm_sum / n_global if n_global else math.nan  # a batch that scores nothing trains the router only
        loss = lm_loss + router if n_global else router
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.step + 1, "loss", loss, self.last_checkpoint)
        lr = lr_at(self.step, peak=self.options.lr, warmup=self.options.warmup_steps, total=self.total_steps,
                   min_ratio=self.options.min_lr_ratio)
        set_lr(self.optimizer, lr)
        grad_norm = clip_grad_norm(self.model, self.options.grad_clip or math.inf).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(self.step + 1, "gradient norm", grad_norm, self.last_checkpoint)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += input_ids.numel()
        record = {"step": self.step, "loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm,
                  "lr": lr, "tokens": self.tokens}
        if counts is not None:
            counts = all_reduce(counts.float(), "sum")
            record["expert_load"] = [[round(v, 4) for v in row] for row in (counts / counts.sum(1, keepdim=True))
                                     .tolist()]
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and, given token_bytes, bits per byte: the summed loss over
        the UTF-8 bytes of the scored tokens (EOS predictions count in the loss, as part of the text's cost, and
        add no bytes)."""
        if self.eval_data is None:
            return {}
        self.module.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # summed loss, tokens, bytes
        for input_ids, labels in self.eval_data():
            x, y = self._local_rows(input_ids), self._local_rows(labels)
            # micro-batches as in training, as many on every process (sharded models need all in each forward)
            pieces = math.ceil(math.ceil(input_ids.shape[0] / self.env.world_size) / self.micro)
            for xs, ys in zip(x.tensor_split(pieces), y.tensor_split(pieces), strict=True):
                if xs.shape[0] == 0:  # fewer rows than pieces here: one fully ignored row
                    xs = input_ids[:1].to(self.env.device)
                    ys = torch.full_like(labels[:1], IGNORE).to(self.env.device)
                with self._autocast():  # the fused head: no (rows, T, V) logits, as in training
                    mean = self._forward(xs, ys).lm_loss
                scored = ys != IGNORE
                n = scored.sum()
                if n > 0:  # an all-ignored batch has a nan mean and adds nothing
                    nbytes = self.token_bytes[ys[scored]].sum() if self.token_bytes is not None else n * 0.0
                    total += torch.stack([mean.double() * n, n.double(), nbytes.double()])
        self.module.train()
        loss_sum, n, nbytes = all_reduce(total, "sum").tolist()
        if n == 0:
            raise ValueError("the validation data scored no token (no batches, or every label ignored)")
        val_loss = loss_sum / n
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        if nbytes > 0:
            out["val_bpb"] = loss_sum / math.log(2) / nbytes
        return out

    # ------------------------------------------------------------------ loop
    def fit(self, resume_from: str | Path | None = None, deadline: float | None = None,
            discard_later: bool = False, config_changes: bool = False) -> RunSummary:
        """Train until `options.steps`, the `deadline` (a `time.monotonic()` value for the whole run: the
        final validation and checkpoint are done before it), or SIGINT/SIGTERM; save and summarise.

        Checkpoints in the run directory after the starting step (all of them for a new run, or for one resumed
        from another run directory's checkpoint) belong to a run this one replaces: an error, unless
        `discard_later` deletes them first. A run resumed from another directory starts its own metrics log
        there. `config_changes`: see `resume`."""
        if self.total_steps is None and deadline is None:
            raise ValueError("TrainOptions.steps is None: give a deadline (time budget) or a number of steps")
        start = time.monotonic()
        if resume_from is not None:
            self.resume(resume_from, config_changes=config_changes)
            if nothing_left(self.options.steps, self.step, self.last_val if self.eval_data is not None else {}):
                raise ValueError(f"TrainOptions.steps={self.options.steps}: the run resumed from "
                                 f"{self.last_checkpoint} is at step {self.step} already; give more steps to continue")
        else:
            torch.manual_seed(_process_seed(self.options.seed, self.env.rank))
        self._refit_pending = resume_from is not None and self.options.steps is None and deadline is not None
        first_step, first_tokens = self.step, self.tokens
        resumed = self.last_checkpoint if resume_from is not None else None
        own = resumed is not None and ckpt.in_run(resumed, self.run_dir)  # else a new history here
        self._clear_later_checkpoints(discard_later, resumed)
        metrics = (MetricsLogger(self.run_dir, resume_step=self.step if own else None,
                                 resume_validated=self.last_val.get("step") == self.step,
                                 tensorboard=self.tensorboard) if self.env.is_main else None)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.env.is_main))
        timer = _Timer(save_seconds=1.0 + 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e8,
                       eval_seconds=self._eval_seconds or 0.0)
        self.module.train()
        stopped_by = "steps"
        unlogged: dict[str, Any] | None = None  # the latest step's record, when --log-every skipped it
        previous = self._install_signal_handlers()
        try:
            if resume_from is None and self.eval_data is not None:
                self._timed_validation(timer, metrics, bar)
            while self.total_steps is None or self.step < self.total_steps or self._refit_pending:
                if (reason := self._should_stop(deadline, timer)) is not None:
                    stopped_by = reason
                    break
                record = self.train_step()
                timer.tick(self.options.batch_size * self.options.seq_len)
                rate = timer.tokens_per_s  # None after a (re)start's first step, which is not timed
                if rate is not None:
                    record["tokens_per_s"] = round(rate, 1)
                record["elapsed"] = round(time.monotonic() - start, 3)
                unlogged = record
                if metrics is not None and self.step % self.options.log_every == 0:
                    metrics.log(record)
                    unlogged = None
                bar.update(1)
                shown = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}"}
                if rate is not None:
                    shown["tok_s"] = f"{rate:,.0f}"
                bar.set_postfix(shown, refresh=False)
                validate = self.step % self.options.eval_every == 0 and self.eval_data is not None
                if validate:
                    self._timed_validation(timer, metrics, bar)
                if self._refit_schedule(deadline, timer, validate):
                    self.total_steps = self._budget_steps(deadline, timer)
                    bar.total = self.total_steps
                if self.step % self.options.save_every == 0:
                    timer.save_seconds = timer.exclude(self.save)
            if metrics is not None and unlogged is not None:  # the last step is logged, whatever --log-every
                metrics.log(unlogged)
            interrupted = stopped_by.startswith("SIG")
            final_val = not interrupted and self.eval_data is not None and self.last_val.get("step") != self.step
            if final_val:
                self._validate(metrics, bar)
            if final_val or self.saved_step != self.step:  # the checkpoint records the final validation
                self.save()
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
            if metrics is not None:
                metrics.plot()
                metrics.close()
        last_train = next((r["loss"] for r in reversed(metrics.records) if "loss" in r), None) if metrics else None
        return RunSummary(
            steps=self.step, tokens=self.tokens, wall_time=time.monotonic() - start, tokens_per_s=timer.tokens_per_s,
            stopped_by=stopped_by, train_loss=last_train, val_step=self.last_val.get("step"),
            val_loss=self.last_val.get("val_loss"),
            val_ppl=self.last_val.get("val_ppl"), val_bpb=self.last_val.get("val_bpb"),
            checkpoint=self.last_checkpoint, plot=metrics.run_dir / PLOT_FILE if metrics else None,
            metrics=metrics.path if metrics else None, new_steps=self.step - first_step,
            new_tokens=self.tokens - first_tokens)

    def _validate(self, metrics: MetricsLogger | None, bar: Any) -> None:
        result = self.evaluate()
        self.last_val = {"step": self.step, **result}
        if metrics is not None:
            metrics.log({"step": self.step, **result})
            metrics.plot()
        bpb = f", {result['val_bpb']:.4f} bits/byte" if "val_bpb" in result else ""
        if self.env.is_main and self.progress:
            bar.write(f"step {self.step}: validation loss {result['val_loss']:.4f}, "
                      f"perplexity {result['val_ppl']:.2f}{bpb}")

    def _timed_validation(self, timer: _Timer, metrics: MetricsLogger | None, bar: Any) -> None:
        """A validation off the training clock; its duration is what a time budget keeps for the final one (also
        in the checkpoints, for a resumed run before its first validation)."""
        timer.eval_seconds = self._eval_seconds = timer.exclude(lambda: self._validate(metrics, bar))

    def _refit_schedule(self, deadline: float | None, timer: _Timer, validated: bool) -> bool:
        """Without `options.steps`, the schedule length is fitted to the deadline once enough steps are timed
        (within warmup, where the learning rate does not depend on it), then refitted at each validation, so
        that a machine that gets faster or slower still ends its cosine at the deadline; a resumed run's schedule
        is refitted to this fit's deadline after two timed steps."""
        if self.options.steps is not None or deadline is None:
            return False
        if self.total_steps is None or self._refit_pending:  # a resumed run: to this fit's deadline
            fit = timer.steps_timed >= (max(2, min(self.options.warmup_steps, 20)) if self.total_steps is None else 2)
            self._refit_pending = self._refit_pending and not fit
            return fit
        return validated

    @staticmethod
    def _reserve(timer: _Timer) -> float:
        """Seconds to keep for the final validation and checkpoint."""
        return timer.eval_seconds + timer.save_seconds + 1.0

    def _budget_steps(self, deadline: float, timer: _Timer) -> int:
        """The schedule length that fits the deadline, decided by rank 0 for everyone."""
        per_step = timer.seconds_per_step + timer.eval_seconds / self.options.eval_every
        left = deadline - time.monotonic() - self._reserve(timer)
        total = torch.tensor([self.step + max(1, int(0.97 * left / per_step)) if self.env.is_main else 0],
                             device=self.env.device)  # NCCL reduces device tensors only
        return int(all_reduce(total, "max").item())

    def _seconds_to_end_after_a_step(self, timer: _Timer) -> float:
        """Seconds from now to the run's end if it stops after one more step: the step, the final validation and
        checkpoint (`_reserve`) and, after a checkpoint step that is no validation step, the step's own checkpoint
        (the final validation then changes what the checkpoint of that step holds: it is saved again)."""
        step = self.step + 1
        saved_twice = (self.eval_data is not None and step % self.options.save_every == 0
                       and step % self.options.eval_every != 0)
        return timer.seconds_per_step + self._reserve(timer) + (timer.save_seconds if saved_twice else 0.0)

    def _should_stop(self, deadline: float | None, timer: _Timer) -> str | None:
        """'SIGINT'/'SIGTERM' or 'time budget' when any rank (signals) or rank 0 (time) says so."""
        time_up = (deadline is not None and self.env.is_main
                   and time.monotonic() + self._seconds_to_end_after_a_step(timer) > deadline)
        flags = torch.tensor([self._signal or 0, int(time_up)], device=self.env.device)
        signum, time_up = all_reduce(flags, "max").tolist()
        if signum:
            return signal.Signals(signum).name
        return "time budget" if time_up else None

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}

        def handler(signum: int, _frame: Any) -> None:
            self._signal = signum
            self._restore_signal_handlers(previous)  # a second Ctrl-C stops at once

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                previous[s] = signal.signal(s, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for s, h in previous.items():
            signal.signal(s, h)


class _Timer:
    """Training throughput (validation and checkpoint time excluded, and the first step with its one-off
    costs) and the durations the time budget must reserve."""

    def __init__(self, save_seconds: float, eval_seconds: float = 0.0) -> None:
        self.mark = time.monotonic()
        self.first = True
        self.train_seconds, self.steps_timed, self.tokens_timed = 0.0, 0, 0
        self.recent: deque[float] = deque(maxlen=20)  # the latest step durations
        # until measured: the resumed run's validation, the weights + 2 AdamW moments' write
        self.eval_seconds, self.save_seconds = eval_seconds, save_seconds

    def tick(self, tokens: int) -> None:
        now = time.monotonic()
        if not self.first:
            self.train_seconds += now - self.mark
            self.steps_timed += 1
            self.tokens_timed += tokens
            self.recent.append(now - self.mark)
        self.first, self.mark = False, now

    def exclude(self, fn: Callable[[], Any]) -> float:
        """Run `fn` off the training clock; returns its duration."""
        t0 = time.monotonic()
        fn()
        seconds = time.monotonic() - t0
        self.mark += seconds
        return seconds

    @property
    def seconds_per_step(self) -> float:
        """Mean duration of the latest steps (the machine's load may change)."""
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def tokens_per_s(self) -> float | None:
        """None before a step was timed."""
        return self.tokens_timed / self.train_seconds if self.train_seconds else None
