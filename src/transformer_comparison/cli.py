"""The `tcompare` command line: one sub-command per module, each exposing add_arguments() and run()."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from transformer_comparison.errors import UserError

# sub-command name -> (module, one-line help). Adding a command is adding a line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("transformer_comparison.train", "train a GPT language model for one mechanism x encoding"),
    "generate": ("transformer_comparison.generate", "sample text from a trained run"),
    "compare": ("transformer_comparison.compare", "train the mechanism x encoding grid and write a report"),
    "report": ("transformer_comparison.report", "rebuild a comparison's report from its saved results"),
    "bench": ("transformer_comparison.bench", "kernel and decoding benchmarks"),
    "eval": ("transformer_comparison.evaluate", "length extrapolation of a trained run"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, the named sub-command's module is the only one imported."""
    parser = argparse.ArgumentParser(prog="tcompare", description="Compare attention mechanisms and positional encodings on language modelling.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UserError, ValueError) as error:
        if os.environ.get("TCOMPARE_DEBUG"):
            raise
        print(f"tcompare {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tcompare {args.command}: interrupted", file=sys.stderr)
        return 130
