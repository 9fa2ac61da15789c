"""Arguments shared by sub-commands: a config from a preset or file plus `--set key=value` overrides."""

from __future__ import annotations

import argparse
import json
import os
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mixcon.checks import is_number, within
from mixcon.config import PRESETS, MixConConfig
from mixcon.data.corpus import SPEC_FORMS
from mixcon.ops.dtypes import DTYPES

DEFAULT_CONFIG = "small"


def add_config_args(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    parser.add_argument("--config", default=default,
                        help=f"preset ({', '.join(sorted(PRESETS))}) or a JSON/YAML config file (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set d_model=384 --set attn_per_block=0 (repeatable)")


def add_dtype_argument(parser: argparse.ArgumentParser,
                       help: str = "parameter and activation dtype (Conba states stay fp32; default: %(default)s)",
                       ) -> None:
    """--dtype: a name in DTYPES for the parameters and activations (or what `help` says)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help=help)


def device_type(text: str) -> str:
    """argparse type of --device: a torch device that this machine has (else a clear usage error)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)") from e
    if device.type == "cpu":
        return text
    if device.type == "meta":  # shapes without data: nothing a command could compute or load onto
        raise argparse.ArgumentTypeError(f"{text!r} holds no data; use cpu, cuda, ... (`mixcon info` sizes a "
                                         "model without memory)")
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    if device.type == "mps":
        count = int(torch.backends.mps.is_available())
    elif hasattr(backend, "device_count"):
        count = backend.device_count()
    else:
        return text  # a backend torch cannot count: let it fail or work
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no {device.type} device (torch "
                                         f"{torch.__version__}); use cpu")
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {device.type} device(s), "
                                         f"{device.type}:0 to {device.type}:{count - 1}")
    return text


def number_type(kind: type[int] | type[float], minimum: float | None = None, *, above: bool = False,
                maximum: float | None = None, below: bool = False, many: bool = False, hint: str = ""
                ) -> Callable[[str], Any]:
    """argparse type: a `kind` (int, or a finite float) >= `minimum` (> when `above`) and <= `maximum` (< when
    `below`), each when given (`many`: comma-separated, a list); else a usage error that names the flag and the
    allowed values (then `hint`), before any work."""
    bounds = ("" if minimum is None else f" {'>' if above else '>='} {minimum}" if maximum is None
              else f" in {'(' if above else '['}{minimum}, {maximum}{')' if below else ']'}")
    noun = {(int, False): "an integer", (int, True): "integers", (float, False): "a finite number",
            (float, True): "finite numbers"}[kind, many]
    allowed = ("comma-separated " if many else "") + noun + bounds

    def fits(value: float) -> bool:
        return is_number(value) and within(value, minimum, maximum, above=above, below=below)

    def parse(text: str) -> Any:
        try:
            values = [kind(v) for v in (text.split(",") if many else [text])]
        except ValueError:
            values = []
        if not values or not all(fits(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}{hint}")
        return values if many else values[0]

    return parse


# argparse type of a seed: what torch.Generator.manual_seed takes, from 0 up.
SEED = number_type(int, 0, maximum=2**64 - 1)
# argparse type of a held-out fraction.
FRACTION = number_type(float, 0, maximum=1, below=True)


_COUNT = number_type(int, 0)


def byte_limit(text: str) -> int | None:
    """argparse type of --max-bytes: a count of bytes, 0 (all of them) given as None."""
    return _COUNT(text) or None


def add_max_bytes_argument(parser: argparse.ArgumentParser, default: int | None, what: str) -> None:
    """--max-bytes N: `what` reads the corpus's first N bytes, the last document cut there; 0 (or the default
    None): all of it (as `mixcon train --max-bytes 0`)."""
    parser.add_argument("--max-bytes", type=byte_limit, default=default,
                        help=f"{what} only the first N bytes of the corpus, e.g. 5_000_000 (the last document is cut "
                             f"there; 0: all) (default: {'all' if default is None else f'{default:_}'})")


def output_file(text: str) -> Path:
    """argparse type of a FILE to write results to: not a directory, in a directory that exists or can be made
    (checked before any work, so that the results are not lost at the end); '~' is the home folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; name a file to write")
    folder = next(p for p in path.absolute().parents if p.exists())  # the nearest existing one
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {folder}")
    return path


def output_folder(text: str) -> Path:
    """argparse type of a FOLDER to write results into: not a file, nor below one (checked before any work); '~' is
    the home folder."""
    path = Path(text).expanduser()
    if not text or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder; name one to write into")
    if _below_a_file(path):
        raise argparse.ArgumentTypeError(f"{text!r}: a file lies on its path")
    return path


def _below_a_file(path: Path) -> bool:
    """Whether the nearest existing folder above `path` is a file (so `path` cannot be made)."""
    return not next(p for p in path.absolute().parents if p.exists()).is_dir()


def check_out_folder(command: str, out: str | Path, what: str = "a folder") -> Path:
    """--out as a Path, exiting with a message when it names a file or lies below one (checked before any work)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"mixcon {command}: --out {out} is a file; give {what}")
    if _below_a_file(path):
        raise SystemExit(f"mixcon {command}: --out {out}: a file lies on its path; give {what}")
    return path


def existing_folder(text: str) -> Path:
    """argparse type of a folder that must exist ('~': the home folder)."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such folder")
    return path


def add_device_argument(parser: argparse.ArgumentParser, default: str | None, shown: str | None = None) -> None:
    """--device, checked by `device_type`; `shown` describes the default in the help."""
    parser.add_argument("--device", type=device_type, default=default,
                        help=f"torch device (default: {shown or default})")


AVAILABLE_DEVICE = "cuda when available, else cpu"


def add_available_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, by default CUDA when this machine has it, else the CPU."""
    add_device_argument(parser, "cuda" if torch.cuda.is_available() else "cpu", shown=AVAILABLE_DEVICE)


def check_cuda_graphs(command: str, args: argparse.Namespace) -> None:
    """--cuda-graphs (`capture_decode`) needs a CUDA --device: a SystemExit that names `command` otherwise."""
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise SystemExit(f"{command}: --cuda-graphs needs a CUDA --device, got {args.device}")


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """KEY=VALUE items (given to `flag`) -> {field: parsed value}; unknown fields and bad items raise ValueError."""
    fields = MixConConfig.field_names()
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"{flag} {item!r}: unknown config field {key!r}; fields: {', '.join(sorted(fields))}")
        if key == "extra":  # parse_value never gives a mapping
            raise ValueError(f"{flag} {item!r}: extra must be a mapping (free-form metadata); give it in a "
                             "--config file")
        out[key] = parse_value(value)
    return out


CONFIG_FILE_HOLDS = 'it must hold a mapping of config fields, e.g. {"preset": "small", "d_model": 384}'


def load_config_file(path: Path) -> dict[str, Any]:
    """The mapping of config fields in a JSON or YAML (.yaml, .yml) file; anything else exits naming the file."""
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise SystemExit(f"--config {str(path)!r}: reading YAML needs PyYAML (pip install pyyaml)") from e
        kind, parse, errors = "YAML", yaml.safe_load, yaml.YAMLError
    else:
        kind, parse, errors = "JSON", json.loads, ValueError
    try:
        text = path.read_text()
        data = parse(text) if text.strip() else None
    except (UnicodeDecodeError, errors) as e:
        mark = getattr(e, "problem_mark", None)  # where YAML found it (its message spans lines)
        reason = f"{e.problem}, line {mark.line + 1} column {mark.column + 1}" if mark else str(e)
        raise SystemExit(f"--config {str(path)!r}: not valid {kind} ({reason}); {CONFIG_FILE_HOLDS}") from e
    if not isinstance(data, dict):
        what = "nothing" if data is None else reprlib.repr(data)
        raise SystemExit(f"--config {str(path)!r}: holds {what}; {CONFIG_FILE_HOLDS}")
    return data


def command_name(args: argparse.Namespace) -> str:
    """The command the arguments were parsed for, e.g. 'mixcon bench decode'."""
    action = getattr(args, "action", None) or getattr(args, "bench", None)
    return " ".join(str(part) for part in ("mixcon", getattr(args, "command", None), action) if part)


def set_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`parse_overrides` of the --set items; a bad one exits naming the command."""
    try:
        return parse_overrides(args.overrides)
    except ValueError as e:
        raise SystemExit(f"{command_name(args)}: {e}") from e


def config_from_args(args: argparse.Namespace) -> MixConConfig:
    """The config named by --config (DEFAULT_CONFIG when None) with the --set overrides applied (errors exit with
    the message)."""
    name = DEFAULT_CONFIG if args.config is None else args.config
    command = command_name(args)
    overrides = set_overrides(args)
    try:
        if name in PRESETS:
            return MixConConfig.preset(name, **overrides)
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"--config {name!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a file")
        data = load_config_file(path)
        if "preset" in data:  # {"preset": "small", "d_model": 384, ...}
            return MixConConfig.preset(data.pop("preset"), **{**data, **overrides})
        return MixConConfig.from_dict({**data, **overrides})
    except ValueError as e:
        given = f"--config {name!r}" + (" with --set " + " ".join(args.overrides) if overrides else "")
        raise SystemExit(f"{command}: {given}: {e}") from e
    except SystemExit as e:  # the flags' own messages, after the command's name
        raise SystemExit(f"{command}: {e.code}") from e


def add_command(sub: argparse._SubParsersAction, command: str, title: str,
                command_help: str) -> argparse._SubParsersAction:
    """`mixcon COMMAND ACTION`: adds COMMAND; returns the parsers of its actions."""
    p = sub.add_parser(command, help=command_help,
                       description=f"{title}. `mixcon {command} ACTION --help` for the options of an action.")
    return p.add_subparsers(dest="action", metavar="ACTION", required=True)


def add_corpus_action(actions: argparse._SubParsersAction, action: str, action_help: str,
                      description: str) -> argparse.ArgumentParser:
    """An ACTION reading a corpus: its parser, with --corpus and the spec forms."""
    a = actions.add_parser(action, help=action_help, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=SPEC_FORMS, description=description)
    a.add_argument("--corpus", default=None, help="corpus spec (default: the Python standard library; see below)")
    return a
