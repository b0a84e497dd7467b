"""`tcompare probe`: recall probes beside perplexity. `tcompare probe mqar` trains the project's GPT
(two layers, the registered mechanisms and encodings) on multi-query associative recall and writes
DIR/mqar.csv and plots (docs/probe.md).

    tcompare probe mqar --preset quick --out results/mqar-quick
    tcompare probe mqar --attention_types dot_product,linear,local --seq_lens 64,128 --kv_pairs 4,8,16 \\
        --d_models 32,64,128 --learning_rates 3e-3,1e-2 --test_seq_lens 256 --out results/mqar attention.window=16
    tcompare probe mqar --write_data DIR --seq_lens 64 --kv_pairs 8      # the examples, in the interchange format
    tcompare probe mqar --data DIR --out results/mqar-external            # train on DIR/train.npz, score DIR/test.npz

For the comparison report: `run_probe(settings, out_dir) -> Path` (mqar.csv) and
`report_section(csv_path) -> ProbeSection` (a table, a plain-language statement and the plots).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformer_comparison.errors import UserError
from transformer_comparison.probe.mqar import MQARTask, fraction_within, generate
from transformer_comparison.probe.report import ProbeSection, report_section
from transformer_comparison.probe.settings import (
    DEFAULT_VOCAB,
    PRESETS,
    ProbeSettings,
    with_preset,
)

__all__ = ["MQARTask", "ProbeSection", "ProbeSettings", "add_arguments", "fraction_within", "generate",
           "report_section", "run", "run_probe", "write_data"]

DEFAULT_OUT = Path("results/mqar")


def run_probe(settings: ProbeSettings, out_dir: Path, log: Any = print) -> Path:
    """Run (or resume) the sweep into out_dir; returns DIR/mqar.csv."""
    from transformer_comparison.probe.runner import (
        run_probe as _run_probe,  # torch only when running
    )

    return _run_probe(settings, out_dir, log=log)


def write_data(settings: ProbeSettings, directory: Path) -> tuple[Path, Path]:
    """Write the examples the sweep would train and test on (one L, one D, its first seed) as
    DIR/train.npz and DIR/test.npz."""
    from transformer_comparison.probe.datasets import write_examples
    from transformer_comparison.probe.mqar import check_task
    from transformer_comparison.probe.runner import first_seed, generated_examples

    if len(settings.seq_lens) != 1 or len(settings.kv_pairs) != 1:
        raise UserError("--write_data writes one data set: give one --seq_lens value and one --kv_pairs value")
    if settings.test_seq_lens or settings.data_dir is not None:
        raise UserError("--write_data writes test.npz at the training length; drop --test_seq_lens and --data")
    check_task(settings.generated_vocab, settings.seq_lens[0], settings.kv_pairs[0], settings.alpha)
    if settings.num_train < 1 or settings.num_test < 1:
        raise UserError(f"--num_train and --num_test must be >= 1; got {settings.num_train} and {settings.num_test}")
    train, tests = generated_examples(settings, settings.seq_lens[0], settings.kv_pairs[0], first_seed(settings),
                                      (settings.seq_lens[0],))
    write_examples(directory, train, tests[settings.seq_lens[0]])
    return directory / "train.npz", directory / "test.npz"


# ----------------------------------------------------------------------------------------------
# the command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    probes = parser.add_subparsers(dest="probe", required=True, metavar="PROBE")
    mqar = probes.add_parser("mqar", help="multi-query associative recall (Zoology, Arora et al. 2023)",
                             description="Train the GPT on multi-query associative recall for every mechanism x encoding.")
    mqar.set_defaults(command_parser=mqar)
    defaults = ProbeSettings()
    grid = mqar.add_argument_group("the sweep (comma-separated lists)")
    grid.add_argument("--attention_types", metavar="A,B", help="mechanisms (default: every registered one)")
    grid.add_argument("--position_embeddings", metavar="X,Y",
                      help=f"encodings (default: {','.join(defaults.position_embeddings) or 'every registered one'}; all: every registered one)")
    grid.add_argument("--seq_lens", metavar="L,...", help=f"training lengths L, even (default {_csv(defaults.seq_lens)})")
    grid.add_argument("--kv_pairs", metavar="D,...", help=f"key-value pairs D, 4D <= L (default {_csv(defaults.kv_pairs)})")
    grid.add_argument("--d_models", metavar="N,...", help=f"model widths (default {_csv(defaults.d_models)})")
    grid.add_argument("--learning_rates", metavar="LR,...",
                      help=f"learning rates swept per cell, the best reported (default {_csv(defaults.learning_rates)})")
    grid.add_argument("--seeds", metavar="N", help=f"seeds per run: training.seed + 0..N-1 (default {defaults.seeds})")
    grid.add_argument("--test_seq_lens", metavar="L,...", help="also score every model at these longer lengths")
    task = mqar.add_argument_group("the task")
    task.add_argument("--vocab_size", metavar="V", help=f"vocabulary, V > every length (default {DEFAULT_VOCAB}; "
                      "with --data the data's largest id + 1)")
    task.add_argument("--alpha", metavar="A", help=f"power law of the query gaps (default {defaults.alpha})")
    task.add_argument("--random_non_queries", choices=("on", "off"), help="random tokens between queries (default on)")
    task.add_argument("--num_train", metavar="N", help=f"training examples (default {defaults.num_train})")
    task.add_argument("--num_test", metavar="N", help=f"held-out examples per test length (default {defaults.num_test})")
    task.add_argument("--data", type=Path, metavar="DIR", help="train on DIR/train.npz and score DIR/test.npz instead of generating")
    task.add_argument("--write_data", type=Path, metavar="DIR", help="write the generated examples to DIR/train.npz, test.npz and exit")
    train = mqar.add_argument_group("training")
    b = defaults.budget
    train.add_argument("--mlp", choices=("on", "off"), help="keep each block's MLP (default off, as zoology)")
    train.add_argument("--batch_size", metavar="N", help=f"examples per step (default {b.batch_size})")
    train.add_argument("--max_steps", metavar="N", help=f"step budget per run (default {b.max_steps})")
    train.add_argument("--warmup_steps", metavar="N", help=f"linear warmup steps (default {b.warmup_steps})")
    train.add_argument("--eval_interval", metavar="N", help=f"steps between held-out checks (default {b.eval_interval})")
    train.add_argument("--eval_examples", metavar="N", help=f"held-out examples per check (default {b.eval_examples})")
    train.add_argument("--target_accuracy", metavar="A", help=f"stop early above this accuracy (default {b.target_accuracy})")
    train.add_argument("--jobs", metavar="N", help="runs at once, one thread each (default: one per CPU core; 1 on CUDA)")
    mqar.add_argument("--preset", choices=tuple(PRESETS), help="quick: a smoke sweep, every registered mechanism once (docs/probe.md)")
    mqar.add_argument("--config", type=Path, help="base YAML config (default: the built-in defaults)")
    mqar.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default {DEFAULT_OUT}, {DEFAULT_OUT}-quick with --preset quick)")
    mqar.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. attention.window=16")


def _csv(values: tuple) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _items(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        raise UserError(f"{flag} {text!r}: give a comma-separated list without empty items")
    return items


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not an integer") from None


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a number") from None


def settings_from_args(args: argparse.Namespace) -> ProbeSettings:
    """Defaults, then --preset, then every flag given."""
    settings = with_preset(ProbeSettings(config_path=args.config, overrides=tuple(args.overrides)), args.preset)
    changes: dict[str, Any] = {}
    if args.attention_types:
        changes["attention_types"] = () if args.attention_types == "all" else tuple(_items(args.attention_types, "--attention_types"))
    if args.position_embeddings:
        changes["position_embeddings"] = () if args.position_embeddings == "all" else tuple(_items(args.position_embeddings, "--position_embeddings"))
    for name in ("seq_lens", "kv_pairs", "d_models", "test_seq_lens"):
        text = getattr(args, name)
        if text:
            changes[name] = tuple(_int(item, f"--{name}") for item in _items(text, f"--{name}"))
    if args.learning_rates:
        changes["learning_rates"] = tuple(_float(item, "--learning_rates") for item in _items(args.learning_rates, "--learning_rates"))
    for name in ("seeds", "vocab_size", "num_train", "num_test", "jobs"):
        if getattr(args, name) is not None:
            changes[name] = _int(getattr(args, name), f"--{name}")
    if args.alpha is not None:
        changes["alpha"] = _float(args.alpha, "--alpha")
    if args.random_non_queries is not None:
        changes["random_non_queries"] = args.random_non_queries == "on"
    if args.mlp is not None:
        changes["mlp"] = args.mlp == "on"
    if args.data is not None:
        given = [f"--{name}" for name in ("seq_lens", "kv_pairs", "test_seq_lens", "alpha", "random_non_queries", "num_train",
                                           "num_test") if getattr(args, name) is not None]
        if given:
            raise UserError(f"--data DIR brings its own examples; drop {', '.join(given)}")
        changes["data_dir"] = args.data
    budget = {name: _int(getattr(args, name), f"--{name}") for name in
              ("batch_size", "max_steps", "warmup_steps", "eval_interval", "eval_examples") if getattr(args, name) is not None}
    if args.target_accuracy is not None:
        budget["target_accuracy"] = _float(args.target_accuracy, "--target_accuracy")
    if budget:
        changes["budget"] = replace(settings.budget, **budget)
    return replace(settings, **changes)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.write_data is not None:
        train_path, test_path = write_data(settings, args.write_data)
        print(f"probe mqar: wrote {train_path} and {test_path}")
        return 0
    out = args.out or (DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{settings.preset}") if settings.preset else DEFAULT_OUT)
    csv_path = run_probe(settings, out)
    section = report_section(csv_path)
    print(f"probe mqar: {csv_path}")
    print(section.statement)
    return 1 if section.failed_runs else 0
