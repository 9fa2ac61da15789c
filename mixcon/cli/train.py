"""`mixcon train`: tokenizer, shards, training with checkpoints and metrics, then a sample. Runs as is on a
laptop CPU, and under `torchrun --nproc_per_node N` with DDP or FSDP2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixcon.cli.common import (
    AVAILABLE_DEVICE,
    DEFAULT_CONFIG,
    FRACTION,
    SEED,
    add_config_args,
    add_device_argument,
    byte_limit,
    check_out_folder,
    config_from_args,
    number_type,
    set_overrides,
)
from mixcon.cli.generate import stream
from mixcon.config import MixConConfig
from mixcon.data import (
    Corpus,
    ShardDataset,
    ShardError,
    TrainLoader,
    eval_batches,
    load_tokenizer,
    prepare_shards,
    training_documents,
)
from mixcon.data.corpus import SPEC_FORMS
from mixcon.data.tokenizer import FILENAME as TOKENIZER_FILE
from mixcon.data.tokenizer import AnyTokenizer, train_bpe_tokenizer
from mixcon.io import LOCK_FILE
from mixcon.models.files import read_config
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.training import checkpoint as ckpt
from mixcon.training.distributed import DistEnv, barrier, gather_objects, init_distributed, shutdown
from mixcon.training.metrics import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR, require_tensorboard
from mixcon.training.optim import warmup_steps
from mixcon.training.trainer import NonFiniteLossError, Trainer, TrainOptions, nothing_left

DEFAULT_TIME_BUDGET = 480.0  # seconds, when neither --steps nor --time-budget is given
SAMPLE_SECONDS = 15.0  # kept from the time budget for loading the final checkpoint and printing a sample
DEFAULTS = TrainOptions()

# argparse types of the options' ranges, checked before any work (TrainOptions.check repeats them for library use)
POSITIVE, COUNT, NONNEGATIVE = number_type(int, 1), number_type(int, 0), number_type(float, 0)
SECONDS, RATIO = number_type(float, 0, above=True), number_type(float, 0, maximum=1)
# (flag, type, choices or "flag" for a switch, help); the TrainOptions field is the flag's name with underscores.
OPTION_FLAGS: list[tuple[str, Any, str]] = [
    ("--steps", POSITIVE, f"optimizer steps (default: as many as the time budget allows, {DEFAULT_TIME_BUDGET:.0f} "
                          "s unless --time-budget is given); with --resume, a new total over which the cosine "
                          "schedule is recomputed (as if the run had always had it: past the old total's end, the "
                          "learning rate rises again)"),
    ("--time-budget", SECONDS, "seconds for the whole command (under torchrun: from the workers' start), data "
                               "preparation and sample included; training "
                               f"stops in time to validate, save and sample (default: {DEFAULT_TIME_BUDGET:.0f} "
                               "without --steps, else none); with --resume, a budget for this command, to whose end "
                               "the cosine schedule is refitted, in place of the run's --steps (--steps without "
                               "it drops the run's budget)"),
    ("--batch-size", POSITIVE, "sequences per optimizer step over all processes"),
    ("--micro-batch-size", POSITIVE, "sequences per forward pass per process; gradients accumulate over the "
                                     "rest (default: batch size / world size; the language-model loss is the "
                                     "same at any micro-batch and world size, the MoE load-balancing loss is "
                                     "a statistic of each micro-batch)"),
    ("--seq-len", POSITIVE, "tokens per training sequence"),
    ("--lr", NONNEGATIVE, "peak learning rate"),
    ("--min-lr-ratio", RATIO, "final learning rate as a fraction of the peak (cosine decay)"),
    ("--warmup-steps", COUNT, "linear warmup steps (at most all but the last of --steps)"),
    ("--weight-decay", NONNEGATIVE, "AdamW weight decay of matrices (never of norms, biases, A_log, dt_bias, D)"),
    ("--grad-clip", NONNEGATIVE, "clip the global gradient norm (0: off)"),
    ("--eval-every", POSITIVE, "validate every N steps"),
    ("--eval-batches", POSITIVE, "validation batches (of --batch-size sequences)"),
    ("--save-every", POSITIVE, "checkpoint every N steps (and at the end)"),
    ("--keep-last", COUNT, "checkpoints to keep (0: all)"),
    ("--log-every", POSITIVE, "write a metrics record every N steps, and at the last"),
    ("--seed", SEED, "seed of initialisation, data order and split"),
    ("--precision", ["auto", "fp32", "bf16"], "auto: bf16 autocast on CUDA, fp32 on CPU"),
    ("--parallel", ["ddp", "fsdp"], "under torchrun: DDP, or FSDP2 (fully_shard per layer)"),
    ("--activation-checkpointing", "flag", "recompute each layer's activations in the backward pass"),
    ("--compile", "flag", "torch.compile each layer (an MoE layer's routing by token counts stays eager between "
                          "its graphs)"),
    ("--document-mask", "flag", "documents packed into a training row do not see each other: Conba states, convs "
                                "and attention restart at each EOS (as evaluation scores documents)"),
    ("--corpus", str, "corpus spec (default: Python's standard library sources); see below"),
    ("--max-bytes", byte_limit, "use the first N bytes of the corpus, the last document cut there (0: all)"),
    ("--tokenizer", str, "'bpe' (train a byte-level BPE of the config's vocab_size on the corpus), 'bytes', or a "
                         "tokenizer path"),
    ("--val-fraction", FRACTION, "share of the corpus's bytes held out for validation, in whole documents (a "
                                 "single text: its last part)"),
]


# Options that decide the shards and the order the loader draws from them: a resumed run keeps them.
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")  # config fields the tokenizer sets
DATA_FIELDS = ("corpus", "max_bytes", "val_fraction", "seed")


def _field(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (CPU or torchrun DDP/FSDP2), resumable", epilog=SPEC_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a MixCon model: tokenizer and shards from the corpus, AdamW with warmup + cosine, "
                    "validation (loss, perplexity, bits per byte), checkpoints, metrics.jsonl and loss.png in --out, "
                    "then a sample. Ctrl-C or SIGTERM saves and exits; --resume continues exactly; --init-from "
                    "starts a new run (e.g. fine-tuning on another corpus) from a model's weights. Several "
                    "processes: torchrun --nproc_per_node N -m mixcon train ...")
    add_config_args(p)
    p.set_defaults(config=None)  # None: DEFAULT_CONFIG for a new run, the checkpoint's config on --resume
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue the latest checkpoint in --out, or the given checkpoint / run directory; options "
                        "not given again keep their saved values, but for --device, --sample-tokens, --prompt, "
                        "--tensorboard and --no-progress, this command's (the optimizer's state is the checkpoint's, "
                        "its settings these options'); --set may change config fields that keep the weights' shapes")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from the weights (and tokenizer) of a run directory, checkpoint, save_pretrained or "
                        "`mixcon export hf` directory: a new run at step 0 with a fresh optimizer; its config is the "
                        "model's, --set may change fields that keep the weights' shapes")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that has checkpoints; with "
                   "--resume CHECKPOINT, discard the run's checkpoints after that one")
    for flag, kind, text in OPTION_FLAGS:
        default = getattr(DEFAULTS, _field(flag))
        text = text if "default:" in text or kind == "flag" else f"{text} (default: {default})"
        if kind == "flag":  # --no-X turns it off (a resumed run keeps a switch it was started with)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif isinstance(kind, list):
            p.add_argument(flag, choices=kind, default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    add_device_argument(p, None, shown=AVAILABLE_DEVICE)
    p.add_argument("--sample-tokens", type=number_type(int, 0), default=200,
                   help="tokens to sample at the end (default: 200; 0: none)")
    p.add_argument("--prompt", default=None, help="prompt of the final sample (default: the start of the validation "
                                                  "text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    env = init_distributed(args.device)
    try:
        try:
            with contextlib.ExitStack() as held:  # the run directory's lock, until the command ends
                return _train(args, env, start, held)
        except (ckpt.CheckpointError, ValueError, OSError, ImportError) as e:  # (a file that cannot be written)
            raise SystemExit(f"mixcon train: {e}") from e
    except SystemExit as e:
        if isinstance(e.code, str) and not env.is_main:  # which process said it (most errors: every one)
            raise SystemExit(f"[rank {env.rank}] {e.code}") from None
        raise
    finally:
        shutdown()


def _train(args: argparse.Namespace, env: DistEnv, start: float, held: contextlib.ExitStack) -> int:
    say = print if env.is_main else _quiet
    if args.init_from is not None and args.resume is not None:
        raise SystemExit("mixcon train: --resume continues a run, --init-from starts a new one from a model's "
                         "weights; give one of them")
    if args.out is not None and not args.out.strip():
        raise SystemExit("mixcon train: --out '': give a run directory")
    reserve = SAMPLE_SECONDS if args.sample_tokens > 0 else 0.0
    _check_budget(getattr(args, "time_budget", None), reserve)  # a given flag, before anything is written
    resume = None
    if args.resume is not None:
        resume = ckpt.resolve_checkpoint(args.resume or _out_dir(args))
    out = Path(args.out) if args.out else (resume.parent.parent if resume else _out_dir(args))
    check_out_folder("train", out, "a run directory")
    refusal = None
    if env.is_main:  # one trainer per run directory; made (and found writable) before any work
        try:
            held.enter_context(ckpt.lock_run(out))
        except ckpt.CheckpointError as e:
            refusal = f"mixcon train: {e}"
        except OSError as e:
            refusal = f"mixcon train: --out {out}: cannot write there ({e})"
        saves = out / ckpt.CHECKPOINTS
        if refusal is None and saves.is_dir() and not os.access(saves, os.W_OK | os.X_OK):
            refusal = f"mixcon train: {saves}: cannot write there (the run's checkpoints are saved there)"
    refusal = gather_objects(refusal)[0]  # every process ends with it (the others would wait for rank 0 in vain)
    if refusal is not None and env.distributed:
        # Each process says it, then all end together: torchrun stops the other processes when one ends.
        print(refusal if env.is_main else f"[rank {env.rank}] {refusal}", file=sys.stderr, flush=True)
        barrier()
        raise SystemExit(1)
    if refusal is not None:
        raise SystemExit(refusal)
    state = ckpt.read_trainer_state(resume) if resume is not None else None  # (options, step, data position)
    options = _options(args, resume, state, say, env.world_size)
    if 0 < (warmup := warmup_steps(options.warmup_steps, options.steps)) < options.warmup_steps:
        say(f"warmup: {options.warmup_steps} steps shortened to {warmup}, all but the last of --steps {options.steps}")
    _check_budget(options.time_budget, reserve)  # the resumed run's, when not given
    if args.tensorboard:  # before anything is written
        require_tensorboard()
    initial = _initial_model(args, out)  # (its directory, config, tokenizer) or None
    if not args.overwrite:  # (with it, the replaced checkpoints go when training starts: Trainer.fit's discard_later)
        _check_replaced(out, resume)
    _check_tokenizer_fields(args, resume, bpe_sized=initial is None and options.tokenizer == "bpe")
    tok = initial[2] if initial else _tokenizer(options, resume, out, args, env)
    config = _config(args, resume, tok, initial[1] if initial else None)
    if resume is not None:
        _check_config_changes(MixConConfig.load(resume / ckpt.CONFIG_NAME), config, say)
        _check_steps_left(options, resume, state)
    ds = _dataset(options, tok, out, env, state, progress=not args.no_progress)
    torch.manual_seed(options.seed)  # the same initial weights in every process
    model = MixConForCausalLM(config)
    if initial:  # the weights are read here, into the model, and not kept beside it
        state = MixConForCausalLM.from_pretrained(initial[0]).state_dict()
        ckpt.check_model_state(state, {k: v.shape for k, v in model.state_dict().items()}, initial[0],
                               cause="; --set may change only config fields that keep the weights' shapes")
        model.load_state_dict(state)
        del state
    say(model.summary())
    say(ds.summary())
    loader = TrainLoader(ds, options.seq_len, options.batch_size, seed=options.seed)
    has_val = len(ds.tokens("val")) > options.seq_len
    if not has_val and len(ds.tokens("val")):
        say(f"no validation: the validation split's {len(ds.tokens('val')):,} tokens do not fill one sequence of "
            f"--seq-len {options.seq_len} + 1; raise --val-fraction or lower --seq-len")

    def eval_data() -> Any:
        return eval_batches(ds, options.seq_len, options.batch_size, max_batches=options.eval_batches)

    trainer = Trainer(model, options, out, loader=loader, eval_data=eval_data if has_val else None,
                      token_bytes=tok.token_bytes() if has_val else None, tokenizer=tok, env=env,
                      progress=not args.no_progress, tensorboard=args.tensorboard)
    deadline = None
    if options.time_budget is not None:
        deadline = start + options.time_budget - reserve
    origin = f"from {resume}" if resume else f"from the weights of {initial[0]}" if initial else "from scratch"
    say(f"training {origin} in {out}: {options.batch_size} x "
        f"{options.seq_len} tokens per step, " + (f"{options.steps} steps" if options.steps else
                                                  f"as many steps as fit {options.time_budget:.0f} s"))
    try:
        summary = trainer.fit(resume_from=resume, deadline=deadline, discard_later=args.overwrite,
                              config_changes=True)  # (checked above)
    except NonFiniteLossError as e:
        say(f"mixcon train: {e}")
        return 1
    say("\n" + summary.format())
    if summary.stopped_by == "time budget" and summary.new_steps == 0:
        kept = f", {reserve:.0f} s are kept for the sample" if reserve else ""
        say(f"mixcon train: --time-budget {options.time_budget:g} s ran out before a training step "
            f"({time.monotonic() - start:.0f} s went to preparing the run{kept}); continue with --resume and a "
            "larger --time-budget")
        return 1
    if env.is_main and args.sample_tokens > 0 and not summary.stopped_by.startswith("SIG"):
        prompt = args.prompt if args.prompt is not None else _default_prompt(ds, tok)
        say(f"\nsample ({args.sample_tokens} tokens, temperature 0.8):\n" + "-" * 60)
        sample_model = MixConForCausalLM.from_pretrained(summary.checkpoint, device=str(env.device))
        stream(sample_model, tok, prompt, args.sample_tokens, seed=options.seed)
        say("-" * 60)
    say(f"\ncheckpoint: {summary.checkpoint}\nloss plot:  {out / PLOT_FILE}\nmetrics:    {out / METRICS_FILE}\n"
        f"more text:  mixcon generate --checkpoint {shlex.quote(str(out))} --prompt '...'\n"
        f"continue:   mixcon train --out {shlex.quote(str(out))} --resume")
    if summary.stopped_by.startswith("SIG"):  # as a shell reports a program a signal stopped: 130 for Ctrl-C
        return 128 + signal.Signals[summary.stopped_by].value
    return 0


def _run_outputs(out: Path) -> list[Path]:
    """What a run writes in its directory: left out of a corpus that holds it (the rest of `out` is read)."""
    return [out / name for name in (LOCK_FILE, "data", "tokenizer", ckpt.CHECKPOINTS, TENSORBOARD_DIR, METRICS_FILE,
                                    PLOT_FILE)]


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


def _check_budget(budget: float | None, reserve: float) -> None:
    """A time budget must leave time for training after the `reserve` kept for the sample."""
    if budget is not None and budget <= reserve:
        raise SystemExit(f"mixcon train: --time-budget {budget:g}: its last {reserve:.0f} s are kept for the "
                         "sample, which leaves none for training; give more, or --sample-tokens 0")


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / Path(args.config or DEFAULT_CONFIG).stem


def _options(args: argparse.Namespace, resume: Path | None, state: dict[str, Any] | None, say: Any,
             world_size: int) -> TrainOptions:
    """Saved options of the resumed run (`state`: its checkpoint's trainer state), or the defaults, updated with the
    flags given on this command line."""
    given = {_field(flag): getattr(args, _field(flag)) for flag, _, _ in OPTION_FLAGS if hasattr(args, _field(flag))}
    if resume is None:
        options = dataclasses.replace(DEFAULTS, **given)
        if options.steps is None and options.time_budget is None:
            options.time_budget = DEFAULT_TIME_BUDGET
    else:
        saved = TrainOptions.from_dict(state["options"])
        if given.get("tokenizer", saved.tokenizer) != saved.tokenizer:
            raise SystemExit(f"mixcon train: --resume keeps the run's tokenizer ({saved.tokenizer!r}); --tokenizer "
                             f"{given['tokenizer']!r} would change the model's vocabulary (start a new run with "
                             f"--init-from to change it)")
        if data := [key for key in DATA_FIELDS if key in given and given[key] != getattr(saved, key)]:
            raise SystemExit(f"mixcon train: --resume continues on the run's data; "
                             f"{', '.join('--' + k.replace('_', '-') for k in data)} would change it (start a new run "
                             f"with --init-from {resume} to train on other data)")
        if "steps" in given and "time_budget" not in given:  # a number of steps, not the old run's budget
            given["time_budget"] = None
        if "time_budget" in given and "steps" not in given:  # a budget, not the old run's steps: the schedule is
            given["steps"] = None  # refitted to its end
        for key, value in given.items():
            if getattr(saved, key) != value:
                say(f"resume: {key} changes from {getattr(saved, key)!r} to {value!r}")
        options = dataclasses.replace(saved, **given)
    try:
        options.check(world_size)
    except ValueError as e:  # named by the flag that sets the field
        raise SystemExit("mixcon train: " + re.sub(r"TrainOptions\.(\w+)", lambda m: "--" + m[1].replace("_", "-"),
                                                   str(e))) from e
    return options


def _check_steps_left(options: TrainOptions, resume: Path, state: dict[str, Any]) -> None:
    """On --resume: --steps must lie beyond the checkpoint's step (checked after the config, whose refusal says
    more about a command that cannot run), or be that step when its final validation is missing (a run stopped
    between the last step's checkpoint and the final validation's: resuming validates, saves and samples)."""
    step = state["step"]
    if nothing_left(options.steps, step, state.get("last_val") or {}):
        raise SystemExit(f"mixcon train: --steps {options.steps}: the run resumed from {resume} is at step {step} "
                         "already; give more --steps to continue it")


def _initial_model(args: argparse.Namespace, out: Path) -> tuple[Path, MixConConfig, AnyTokenizer] | None:
    """The model directory of --init-from (verified once), its config and tokenizer (its own unless --tokenizer
    names one), or None."""
    if args.init_from is None:
        return None
    if args.config is not None:
        raise SystemExit("mixcon train: --init-from takes the model's config; --config cannot change it (--set can "
                         "change fields that keep the weights' shapes)")
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer == "bpe":
        raise SystemExit("mixcon train: --init-from keeps the model's tokenizer; --tokenizer bpe would train a new "
                         "one (name 'bytes' or a tokenizer path, or leave --tokenizer out)")
    source = ckpt.model_directory(args.init_from)
    if source.resolve().is_relative_to(out.resolve()):
        raise SystemExit(f"mixcon train: --init-from {args.init_from} lies in --out {out}; choose another --out")
    config, _ = read_config(source)
    return source, config, ckpt.model_tokenizer(source, config.vocab_size, tokenizer)


def _check_replaced(out: Path, resume: Path | None) -> None:
    """Before any work, refuse checkpoints in `out` that the run would replace without --overwrite: all of them for
    a new run or one resumed from another run directory, those after the resumed one for a run going back."""
    replaced = ckpt.replaced_checkpoints(out, resume)
    if not replaced:
        return
    if resume is None:
        raise SystemExit(f"mixcon train: {out} already holds a run (latest checkpoint {replaced[-1].name}); "
                         "continue it with --resume, start afresh with --overwrite, or choose another --out")
    if not ckpt.in_run(resume, out):
        raise SystemExit(f"mixcon train: --resume {resume} continues another run directory's run, and --out {out} "
                         f"already holds a run (latest checkpoint {replaced[-1].name}); replace it with "
                         "--overwrite, or choose another --out")
    raise SystemExit(f"mixcon train: {out} holds checkpoints after {resume.name} ({ckpt.checkpoint_names(replaced)}); "
                     f"go back to {resume.name} with --overwrite (they are deleted), or resume the latest")


def _tokenizer(options: TrainOptions, resume: Path | None, out: Path, args: argparse.Namespace,
               env: DistEnv) -> AnyTokenizer:
    """The resumed checkpoint's tokenizer; or 'bytes', a saved one, or a BPE trained here (by rank 0)."""
    if resume is not None:
        return load_tokenizer(resume / ckpt.TOKENIZER_DIR)
    if options.tokenizer != "bpe":
        try:
            return load_tokenizer(options.tokenizer)
        except FileNotFoundError as e:
            raise SystemExit(f"mixcon train: --tokenizer {options.tokenizer!r}: expected 'bpe' (train a byte-level "
                             f"BPE on the corpus), 'bytes', a {TOKENIZER_FILE} file, or a directory containing one"
                             ) from e
    trained = out / "tokenizer"
    if env.is_main:
        vocab = config_from_args(args).vocab_size
        print(f"training a byte-level BPE tokenizer ({vocab} tokens) on the corpus's training split...")
        corpus = Corpus.from_spec(options.corpus, exclude=_run_outputs(out))
        documents = training_documents(corpus, options.val_fraction, options.seed,
                                       options.max_bytes)  # the validation text stays unseen
        train_bpe_tokenizer(documents, vocab).save(trained)
    barrier()
    return load_tokenizer(trained)


def _check_tokenizer_fields(args: argparse.Namespace, resume: Path | None, bpe_sized: bool) -> None:
    """--set may not give the config fields the tokenizer sets (they were replaced silently), vocab_size only where
    it sizes the run's BPE (`bpe_sized`); checked before a BPE is trained."""
    fixed = set(set_overrides(args)) & set(TOKENIZER_FIELDS) - ({"vocab_size"} if bpe_sized else set())
    if fixed:
        how = ("a resumed run keeps its tokenizer" if resume is not None else
               "the vocabulary is --init-from's model's" if args.init_from is not None else
               "choose the tokenizer with --tokenizer (vocab_size sizes the BPE of --tokenizer bpe)")
        raise SystemExit(f"mixcon train: --set {', '.join(sorted(fixed))}: the tokenizer sets them; {how}")


def _config(args: argparse.Namespace, resume: Path | None, tok: AnyTokenizer,
            initial: MixConConfig | None) -> MixConConfig:
    """The config asked for (vocabulary and special tokens from the tokenizer); on --resume without --config, the
    checkpoint's; from --init-from, the model's (the vocabulary stays the model's, the special tokens are the
    tokenizer's); either with the --set changes."""
    saved = initial
    if resume is not None and args.config is None:
        saved = MixConConfig.load(resume / ckpt.CONFIG_NAME)
        if not args.overrides:
            return saved
    specials = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if saved is not None:  # the resumed or initial model's config with the --set changes
        try:
            return saved.replace(**{**set_overrides(args), **specials})
        except ValueError as e:
            raise SystemExit(f"mixcon train: --set: {e}") from e
    return config_from_args(args).replace(vocab_size=tok.vocab_size, **specials)


def _check_config_changes(saved: MixConConfig, config: MixConConfig, say: Any) -> None:
    """On --resume: the model config may change (--set) only in fields that keep every weight's name and shape;
    checked before any data is prepared, the changes said."""
    changes = ckpt.config_differences(saved, config)
    if not changes:
        return
    with torch.device("meta"):
        before, after = (dict(MixConForCausalLM(c).state_dict()) for c in (saved, config))
    shapes = [{k: v.shape for k, v in state.items()} for state in (before, after)]
    if shapes[0] != shapes[1] or saved.tie_embeddings != config.tie_embeddings:  # (tied: lm_head.weight is embed's)
        raise SystemExit(f"mixcon train: --resume keeps the model's weights, whose names or shapes these config "
                         f"changes would alter: {'; '.join(changes)} (checkpoint != requested); train a new model "
                         "for them")
    for change in changes:
        say(f"resume: model config {change.replace(' != ', ' changes to ')}")


def _dataset(options: TrainOptions, tok: AnyTokenizer, out: Path, env: DistEnv, state: dict[str, Any] | None,
             progress: bool) -> ShardDataset:
    """Shards in RUN/data, built (or reused when unchanged) by rank 0, then opened by the others. A resumed run
    (`state`: its checkpoint's trainer state) continues on the shards its checkpoint read when they are there
    intact (a later version of the split rule would otherwise rebuild them, and the loader refuse the new ones)."""
    ds = None
    if env.is_main:
        ds = _shards_of(state["loader"].get("data"), out / "data") if state is not None else None
        if ds is None:
            ds = prepare_shards(Corpus.from_spec(options.corpus, exclude=_run_outputs(out)), tok, out / "data",
                                val_fraction=options.val_fraction, seed=options.seed, max_bytes=options.max_bytes,
                                progress=progress)
    barrier()
    return ds if ds is not None else ShardDataset(out / "data", verify=False)


def _shards_of(key: str | None, folder: Path) -> ShardDataset | None:
    """The shards in `folder` if they are the ones of `key` (a checkpoint's data position's), intact; else None."""
    try:
        ds = ShardDataset(folder)
    except (ShardError, OSError, ValueError):
        return None
    ds.reused = True
    return ds if key is not None and ds.index["key"] == key else None


def _default_prompt(ds: ShardDataset, tok: AnyTokenizer, n_tokens: int = 12) -> str:
    """The first tokens of the validation text (or of the training text)."""
    tokens = ds.tokens("val") if len(ds.tokens("val")) else ds.tokens("train")
    return tok.decode(tokens[:n_tokens].tolist())
