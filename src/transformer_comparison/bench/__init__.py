"""`tcompare bench`: benchmarks, one sub-command per module (each exposes add_arguments and run)."""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> (module, one-line help). Adding a benchmark is adding a line here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("transformer_comparison.bench.kernels", "time and peak memory of each attention kernel against sequence length"),
    "decode": ("transformer_comparison.bench.decode", "time per generated token and cache size of each mechanism against context length"),
    "train": ("transformer_comparison.bench.train", "the trainer's step time against nanoGPT's, alternating runs in one benchmark"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(bench_handler=module.run, command_parser=sub)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_handler(args) or 0)
