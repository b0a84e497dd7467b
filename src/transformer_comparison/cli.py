"""The `tcompare` command line: one sub-command per module, each exposing add_arguments() and run().

Every command takes `section.key=value` config overrides anywhere on the line (argparse reads one
block of positionals; the ones it leaves over are collected here), and every usage error is one line
on stderr with exit status 2, like the errors the commands raise themselves.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from transformer_comparison import __version__
from transformer_comparison.errors import UserError
from transformer_comparison.openmp import shorten_spin_wait

# sub-command name -> (module, one-line help). Adding a command is adding a line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("transformer_comparison.train", "train a GPT language model for one mechanism x encoding"),
    "generate": ("transformer_comparison.generate", "sample text from a trained run"),
    "compare": ("transformer_comparison.compare", "train the mechanism x encoding grid and write a report"),
    "report": ("transformer_comparison.report", "rebuild a comparison's report from its saved results"),
    "bench": ("transformer_comparison.bench", "kernel and decoding benchmarks"),
    "eval": ("transformer_comparison.evaluate", "length extrapolation of a trained run"),
    "probe": ("transformer_comparison.probe", "recall probes: multi-query associative recall (MQAR)"),
    "list": ("transformer_comparison.listing", "the registered mechanisms and encodings, with their options"),
}
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*", re.DOTALL)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (`--help` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def versions() -> str:
    """This package's version and the torch (with its build tag, e.g. +cpu) and Python it runs on."""
    import torch  # every command imports it anyway: the parser is built before each one runs

    return f"tcompare {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, the named sub-command's module is the only one imported."""
    parser = OneLineParser(prog="tcompare", description="Compare attention mechanisms and positional encodings on language modelling.")
    parser.add_argument("--version", action="version", version=versions())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run, command_parser=sub)  # a nested command sets its own parser
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the line; overrides after other arguments join `args.overrides`, anything else unknown is an error."""
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else None)
    args, extras = parser.parse_known_args(argv)
    overrides = [item for item in extras if OVERRIDE.fullmatch(item)]
    unknown = [item for item in extras if not OVERRIDE.fullmatch(item)]
    if overrides and not hasattr(args, "overrides"):
        unknown = extras
    if unknown:  # said by the command's own parser: "tcompare train: error: ..."
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    shorten_spin_wait()  # before any command imports torch (openmp.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"tcompare {argv[0]}" if argv and argv[0] in COMMANDS else "tcompare"
    try:
        try:
            args = parse(argv)
        except SystemExit as done:  # --help, or a usage error already printed as one line
            return done.code if isinstance(done.code, int) else 2
        command = args.command_parser.prog  # "tcompare bench kernels" for a nested command
        return int(args.handler(args) or 0)
    except (UserError, ValueError) as error:
        if os.environ.get("TCOMPARE_DEBUG"):
            raise
        print(f"{command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
