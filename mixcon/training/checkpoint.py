"""Checkpoints in a run directory: written atomically, hashed, last k kept, refused when corrupt or mismatched.

Layout of `RUN/checkpoints/step-00000100/`:
    config.json, model.safetensors   the model (loadable with `MixConForCausalLM.from_pretrained`)
    tokenizer/                       the tokenizer the model was trained with
    optimizer.pt                     full (unsharded) optimizer state, keyed by parameter name
    trainer_state.pt                 step, schedule, data-loader position, RNG states, training options
    manifest.json                    written last: sha256 and size of every file above

A checkpoint is first written to `.tmp-…` and renamed into place, so a crash mid-write leaves the previous
checkpoints untouched; an old one is renamed to `.tmp-…` before it is deleted; a directory without a manifest is
never a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from mixcon.config import MixConConfig
from mixcon.data.tokenizer import FILENAME as TOKENIZER_FILE
from mixcon.data.tokenizer import AnyTokenizer, load_tokenizer, mismatch
from mixcon.io import fsync_path, locked_directory
from mixcon.models.files import (
    CONFIG_NAME,
    WEIGHTS_METADATA,
    WEIGHTS_NAME,
    read_weights,
    umask_permissions,
    upgrade_expert_layout,
    weight_files,
)
from mixcon.models.mixcon import MixConForCausalLM

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
PREFIX = "step-"
MANIFEST = "manifest.json"
SWAPPED = ".tmp-old-"  # prefix of a directory swapped out by `publish_directory`
# Prefix an old checkpoint is renamed to before it is deleted (keep_last): a crash mid-delete leaves no part of a
# checkpoint under a checkpoint's name, and the next save removes it with the other `.tmp-` directories.
PRUNED = ".tmp-pruned-"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt, or does not match the run it should continue."""


class SavableTokenizer(Protocol):
    def save(self, directory: str | Path) -> Any: ...
    def fingerprint(self) -> str: ...


@dataclass
class Checkpoint:
    """A checkpoint as `load_checkpoint` reads it: its directory, step, model config and weights."""

    path: Path
    step: int
    config: MixConConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    tokenizer_fingerprint: str | None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory, from its name."""
    return int(path.name[len(PREFIX):])


def in_run(checkpoint: str | Path, run_dir: str | Path) -> bool:
    """Whether a checkpoint is one of `run_dir`'s own (in its checkpoints/ folder, which may be a link)."""
    return Path(checkpoint).resolve().parent == (Path(run_dir) / CHECKPOINTS).resolve()


def replaced_checkpoints(run_dir: str | Path, resume: Path | None) -> list[Path]:
    """The checkpoints in `run_dir` that a run there replaces: every one for a new run (`resume` None) or one resumed
    from another run directory's checkpoint, those after `resume` for one going back in its own."""
    found = list_checkpoints(run_dir)
    if resume is None or not in_run(resume, run_dir):
        return found
    return [p for p in found if checkpoint_step(p) > checkpoint_step(resume)]


def checkpoint_names(paths: list[Path]) -> str:
    """The first three checkpoints' names, for a message ("step-00000004, step-00000006, ...")."""
    return ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints of a run (those with a manifest), oldest step first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    _restore_all_swapped(root)
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / MANIFEST).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    restore_swapped(path)  # a checkpoint a crash left swapped out mid-replacement
    if (path / MANIFEST).is_file() or (path / WEIGHTS_NAME).is_file():  # a checkpoint, complete or not
        return path
    if not path.exists():
        siblings = list_checkpoints(path.parent.parent) if path.parent.name == CHECKPOINTS else []
        found = f"; {path.parent} holds {', '.join(p.name for p in siblings)}" if siblings else ""
        raise CheckpointError(f"{path}: no such file or directory{found}")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; give the directory of a checkpoint ({path.parent}?) or of a run")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no {MANIFEST}) nor a run directory with "
                              f"completed checkpoints under {CHECKPOINTS}/")
    return latest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swapped_out(final: Path) -> Path:
    """Where `publish_directory` keeps the `final` it replaces until the new one is in place."""
    return final.with_name(f"{SWAPPED}{final.name}")


def restore_swapped(final: Path) -> None:
    """Put back a `final` that `publish_directory` swapped out when its replacement never arrived (a crash
    between the two renames)."""
    final = Path(os.path.abspath(final))  # (".": the working directory by its name)
    if not final.name:  # the root
        return
    old = _swapped_out(final)
    if old.is_dir() and not final.exists():
        with contextlib.suppress(FileNotFoundError):  # another process restored it first
            old.rename(final)


def _restore_all_swapped(folder: Path) -> None:
    for old in folder.glob(f"{SWAPPED}*"):
        restore_swapped(old.with_name(old.name[len(SWAPPED):]))


def publish_directory(tmp: Path, final: Path) -> None:
    """Make the finished directory `tmp` appear as `final` at once: its files get the permissions of the umask
    (`umask_permissions`) and are synced to disk, then it is renamed into place; a `final` already there is
    swapped out first and deleted after (and put back by `restore_swapped` if a crash came in between)."""
    for p in tmp.rglob("*"):
        if p.is_file():
            umask_permissions(p)
            fsync_path(p)
    restore_swapped(final)
    if final.exists():
        old = _swapped_out(final)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
            final.rename(old)  # a reader put the old one back in between (restore_swapped): out again
            tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_path(final.parent)


@contextlib.contextmanager
def lock_run(run_dir: Path) -> Iterator[None]:
    """Make `run_dir` and hold its lock while the context lasts (`mixcon.io.locked_directory`): a second trainer on
    the same run is refused instead of replacing its checkpoints, metrics and shards."""
    def refuse(pid: str) -> None:
        raise CheckpointError(f"{run_dir} is in use by another training process (pid {pid}); wait for it to end, "
                              "or choose another --out") from None

    with locked_directory(run_dir, refuse):
        yield


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    config: MixConConfig,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer: SavableTokenizer | None = None,
    keep_last: int = 3,
) -> Path:
    """Write the checkpoint of `step` atomically, then delete all but the `keep_last` newest. Call on one rank."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _restore_all_swapped(root)  # a checkpoint swapped out by a crash mid-replacement is not stale
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write; one writer per run
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-{final.name}"
    try:
        tmp.mkdir()
        weights = {k: v.contiguous() for k, v in model_state.items()}
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata=WEIGHTS_METADATA)
        (tmp / CONFIG_NAME).write_text(config.to_json())
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(trainer_state, tmp / STATE_FILE)
        fingerprint = None
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
            fingerprint = tokenizer.fingerprint()
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tokenizer_fingerprint": fingerprint,
            "files": {str(p.relative_to(tmp)): {"sha256": _sha256(p), "size": p.stat().st_size} for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except Exception as e:  # a full disk: OSError, or torch's and safetensors' own errors
        shutil.rmtree(tmp, ignore_errors=True)
        intact = latest_checkpoint(run_dir)
        raise CheckpointError(f"{final.name} not written ({e}); "
                              + (f"{intact} is intact" if intact else "no checkpoint of this run yet")) from e
    publish_directory(tmp, final)  # the same step saved again (e.g. after a resume) replaces the old copy
    for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        try:
            delete_checkpoint(stale)
        except OSError as e:  # the new one is written: training goes on
            pruned = _pruned(stale)
            where = f"; left as {pruned.name}, deleted at the next save" if pruned.exists() else ""
            warnings.warn(f"{final.name} written, but the old checkpoint {stale} could not be deleted (keep_last="
                          f"{keep_last}): {e}{where}", stacklevel=2)
    return final


def _pruned(path: Path) -> Path:
    return path.with_name(f"{PRUNED}{path.name}")


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory: renamed first, so that a crash mid-delete leaves no part of it as a checkpoint
    (the next save removes the rest)."""
    pruned = _pruned(path)
    path.rename(pruned)
    shutil.rmtree(pruned)


def read_manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest; refused (naming the run's newest intact checkpoint before it) if it is missing
    or corrupt."""
    with _naming_intact_before(path):
        return _read_manifest(path)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; an incomplete (interrupted) or foreign checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_file}: corrupt ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError(f"{manifest_file}: corrupt (not a manifest: a JSON object with 'step' and 'files')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_file}: format_version {manifest.get('format_version')!r}, "
                              f"this version of mixcon reads {FORMAT_VERSION}")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], prefixes: tuple[str, ...] = ("",)) -> None:
    """Every file listed in the manifest (whose name starts with one of `prefixes`) exists with its recorded size
    and sha256; the error for a checkpoint of a run that fails names the run's newest intact one before it."""
    with _naming_intact_before(path):
        _check_files(path, manifest, prefixes)


@contextlib.contextmanager
def _naming_intact_before(path: Path) -> Iterator[None]:
    """A CheckpointError raised inside, about checkpoint `path`, with `_intact_before(path)` added."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_intact_before(path)}") from e.__cause__


def _intact_before(path: Path) -> str:
    """'; the newest intact checkpoint before it is ...' for a checkpoint of a run, or ''."""
    if path.parent.name != CHECKPOINTS or not path.name[len(PREFIX):].isdigit():
        return ""
    for earlier in reversed([p for p in list_checkpoints(path.parent.parent)
                             if checkpoint_step(p) < checkpoint_step(path)]):
        try:
            _check_files(earlier, _read_manifest(earlier), ("",))
        except CheckpointError:
            continue
        return (f"; the newest intact checkpoint before it is {earlier} (name it to load it; `mixcon train --resume "
                f"{earlier} --overwrite` continues the run from there)")
    return "; no earlier checkpoint of the run is intact"


def _check_files(path: Path, manifest: dict[str, Any], prefixes: tuple[str, ...]) -> None:
    for name, meta in manifest["files"].items():
        if not name.startswith(prefixes):
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file.stat().st_size != meta["size"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: corrupt (size or sha256 differs from {MANIFEST}); refusing to load it")


def config_differences(a: MixConConfig, b: MixConConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} != {db[k]!r}" for k in sorted(da) if da[k] != db[k]]


def _check_tokenizer(path: Path, fingerprint: str | None, expected: str | AnyTokenizer) -> None:
    """Refuse a checkpoint trained with another tokenizer than `expected` (a fingerprint, or a tokenizer)."""
    wanted = expected if isinstance(expected, str) else expected.fingerprint()
    if fingerprint == wanted:
        return
    why = None
    if not isinstance(expected, str) and (path / TOKENIZER_DIR).is_dir():
        try:
            why = mismatch(load_tokenizer(path / TOKENIZER_DIR), expected)
        except (ValueError, OSError) as e:
            why = f"its own tokenizer does not load ({e})"
        if why is None:  # the same ids, written otherwise
            return
    raise CheckpointError(f"{path}: trained with tokenizer {fingerprint!r}, but this run uses {wanted!r}"
                          + (f" ({why})" if why else ""))


def load_checkpoint(
    path: str | Path,
    *,
    expected_config: MixConConfig | None = None,
    expected_tokenizer: str | AnyTokenizer | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load and verify a checkpoint (or a run directory's latest): hashes, config and tokenizer must match.
    `expected_tokenizer`: a tokenizer fingerprint, or a tokenizer, which also matches a checkpoint whose own
    tokenizer gives every id the same meaning (its file written by another `tokenizers` version, say)."""
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:
        config = MixConConfig.load(path / CONFIG_NAME)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: invalid config ({e})") from e
    if expected_config is not None and (diff := config_differences(config, expected_config)):
        raise CheckpointError(f"{path}: model config differs from the requested one (checkpoint != requested): "
                              + "; ".join(diff))
    fingerprint = manifest.get("tokenizer_fingerprint")
    if expected_tokenizer is not None:
        _check_tokenizer(path, fingerprint, expected_tokenizer)
    try:
        model_state, metadata = read_weights(path / WEIGHTS_NAME, map_location)
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
        optimizer_state = {**optimizer_state, "state": upgrade_expert_layout(optimizer_state["state"], metadata)}
        trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:  # read_weights: ValueError
        raise CheckpointError(f"{path}: unreadable checkpoint file ({e})") from e
    return Checkpoint(path, int(manifest["step"]), config, model_state, optimizer_state, trainer_state, fingerprint)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (options, step, …) without loading the weights."""
    path = resolve_checkpoint(path)
    verify_files(path, read_manifest(path), prefixes=(STATE_FILE,))
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:  # EOFError: an empty file
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({e})") from e


def check_model_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path,
                      cause: str = "") -> None:
    """The weights in `state` (read from the checkpoint or model directory `source`) have exactly the names and
    shapes of the model (`expected`); `cause`: what to say of a mismatch's likely cause."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(expected[k])}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source}: its weights do not match the model; missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}{cause}")


READ_ATTEMPTS = 5  # reads of a run's newest checkpoint, which a run still training may delete meanwhile


def model_directory(path: str | Path) -> Path:
    """The directory of a `save_pretrained` model as given, or of a run's latest checkpoint or a given
    checkpoint, verified against its manifest."""
    path = Path(path)
    restore_swapped(path)  # a directory a crash left swapped out mid-replacement (`export hf --overwrite`)
    if (path / CONFIG_NAME).is_file() and weight_files(path) and not (path / MANIFEST).is_file():
        return path
    path = resolve_checkpoint(path)
    verify_files(path, read_manifest(path), prefixes=(CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_DIR))
    return path


def load_model_and_tokenizer(path: str | Path, device: str = "cpu", tokenizer: str | Path | None = None,
                             dtype: torch.dtype | None = None) -> tuple[MixConForCausalLM, AnyTokenizer]:
    """Model (in eval mode, in `dtype`, by default the saved one) and tokenizer from a run directory (its latest
    checkpoint), a checkpoint (verified against its manifest) or a `save_pretrained` directory (then
    `tokenizer` must name one unless it has tokenizer/ or, as `mixcon export hf` writes, a tokenizer.json).

    A run still training deletes its older checkpoints: one that vanishes while it is read is read again from
    the run's newest."""
    run = Path(path) if (Path(path) / CHECKPOINTS).is_dir() else None
    attempts = 0
    while True:
        directory = resolve_checkpoint(run) if run is not None else Path(path)
        try:
            directory = model_directory(directory)
            model = MixConForCausalLM.from_pretrained(directory, device=device, dtype=dtype)
            return model, model_tokenizer(directory, model.config.vocab_size, tokenizer)
        except Exception as e:
            # Not a checkpoint that its run deleted (all at once, or a file at a time): one that is still the newest
            if run is None or (directory.exists() and directory == latest_checkpoint(run)):
                raise
            attempts += 1
            if attempts == READ_ATTEMPTS:
                raise CheckpointError(f"{path}: its newest checkpoint was replaced while being read, "
                                      f"{READ_ATTEMPTS} times (a run saving often prunes them); try again, or copy "
                                      f"a checkpoint away from the run and name it (the last read's error: {e})"
                                      ) from e


def model_tokenizer(directory: Path, vocab_size: int, tokenizer: str | Path | None = None) -> AnyTokenizer:
    """The tokenizer of the model in `directory` (its tokenizer/ or tokenizer.json), or `tokenizer` when given:
    one whose ids mean other text than the model's own (when that loads), or one with more ids than the model's
    `vocab_size`, is refused."""
    own = [p for p in (directory / TOKENIZER_DIR, directory / TOKENIZER_FILE) if p.exists()]
    if tokenizer is None:
        if not own:
            raise FileNotFoundError(f"{directory} has no {TOKENIZER_DIR}/ nor {TOKENIZER_FILE}; "
                                    "name the tokenizer with --tokenizer")
        tokenizer = own[0]
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {str(tokenizer)!r} has {tok.vocab_size} ids, more than the model's vocab_size "
                         f"{vocab_size}: not the tokenizer this model was trained with")
    if own and Path(tokenizer) != own[0]:
        try:
            trained_with = load_tokenizer(own[0])
        except ValueError:  # the model's own file does not load: the one named replaces it
            return tok
        if why := mismatch(trained_with, tok):
            raise ValueError(f"tokenizer {str(tokenizer)!r} is not the one this model was trained with ({own[0]}): "
                             f"{why}; leave the tokenizer out to use the model's own")
    return tok
