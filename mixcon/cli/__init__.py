"""`mixcon` command line: one sub-command module per job, each with --help."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

import mixcon

# Each module defines `register(subparsers)`, which adds its sub-command(s) with `func=` defaults.
COMMAND_MODULES = [
    "mixcon.cli.info",
    "mixcon.cli.bench",
    "mixcon.cli.tokenizer",
    "mixcon.cli.data",
    "mixcon.cli.train",
    "mixcon.cli.generate",
    "mixcon.cli.eval",
    "mixcon.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixcon",
        description="MixCon: attention + Conba + mixture-of-experts language models.",
    )
    parser.add_argument("--version", action="version", version=f"mixcon {mixcon.__version__} (torch "
                                                               f"{torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub-)command that `argv` names: `mixcon data prepare ...` -> the `data prepare` parser."""
    for token in argv:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        parser = sub.choices.get(token, parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command that got them, with its usage (argparse blames the top level)
        command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    _expand_home(args)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader left (`mixcon info | head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would raise again
        return 1
    except KeyboardInterrupt:  # Ctrl-C (training saves first, in its own handler): no traceback, the shell's code
        print(flush=True)
        print(f"mixcon {args.command}: interrupted", file=sys.stderr)
        return 130


# The options that name files or folders without an argparse type that reads them (output_file, output_folder,
# existing_folder, plot_file expand '~' themselves): '~/...' is the home folder there, as a shell expands it (it does
# not in --out=~/x or a quoted '~/x').
PATH_OPTIONS = ("out", "corpus", "checkpoint", "tokenizer", "config", "resume", "init_from")


def _expand_home(args: argparse.Namespace) -> None:
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith("~"):
            setattr(args, name, type(value)(os.path.expanduser(value)))


if __name__ == "__main__":
    sys.exit(main())
