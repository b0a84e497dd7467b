"""`tcompare bench train`: the trainer's step time against its peer, measured side by side in one run.

The peer is nanoGPT's model and training step (`bench/reference_gpt.py`) on the same config: data,
batch, context, optimiser, threads. The runs alternate, reference then each cell, `--repeats`
times, every run in a fresh process, so a machine that drifts moves them all alike. A cell is
`tcompare train` itself (`--cells dot_product:sinusoidal,flash:sinusoidal`; options as overrides,
e.g. `attention.flash.use_sdpa=true`). Both sides time windows of `--log_interval` steps the same way
(wall clock, ending at the host sync of a logging step); the first `--warmup_windows` are dropped and
a run's step time is the median of the rest. The machine's fp32 matmul peak is measured in the same
run, so achieved FLOP/s (the model's 6N + 12 L d T per token) is also a fraction of what this CPU
can do. A cell's ratio to the reference is the median over repeats of the ratio within a repeat.
The trainer keeps freed memory in its process (`allocator.py`); the reference runs with glibc's
defaults, as nanoGPT does, unless `--reference_keeps_freed_memory`, which isolates what the models
themselves cost. Results: DIR/train_bench.csv, and the median ratios printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from transformer_comparison.allocator import glibc
from transformer_comparison.artifacts.bench import TrainBenchRow
from transformer_comparison.artifacts.io import write_csv
from transformer_comparison.bench.common import comma_list, run_child
from transformer_comparison.bench.reference_gpt import RESULT_PREFIX
from transformer_comparison.errors import UserError

REFERENCE = "nanogpt_reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="the recipe, e.g. configs/nanogpt_cpu.yaml (default: the built-in defaults)")
    parser.add_argument("--cells", type=comma_list, default=["dot_product:sinusoidal", "flash:sinusoidal"],
                        help="mechanism:encoding pairs trained by tcompare train (default: dot_product:sinusoidal,flash:sinusoidal)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of reference and cells (default: %(default)s)")
    parser.add_argument("--log_interval", type=int, default=10, help="steps per timed window (default: %(default)s)")
    parser.add_argument("--warmup_windows", type=int, default=2, help="first windows dropped (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every run (default: torch's default)")
    parser.add_argument("--reference_keeps_freed_memory", action="store_true",
                        help="the reference also keeps freed memory, as tcompare train does (allocator.py), so the "
                             "ratio is the models' own; default: the reference runs as nanoGPT does")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (default: %(default)s)")
    parser.add_argument("--out", default="results/bench", help="output directory (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")


def parse_cells(cells: list[str]) -> list[tuple[str, str]]:
    from transformer_comparison.attention.registry import registered_names
    from transformer_comparison.position import position_names

    parsed = []
    for cell in cells:
        mechanism, sep, encoding = cell.partition(":")
        if not sep or mechanism not in registered_names() or encoding not in position_names():
            raise UserError(f"--cells: {cell!r} should be mechanism:encoding with a mechanism of "
                            f"{', '.join(registered_names())} and an encoding of {', '.join(position_names())}")
        parsed.append((mechanism, encoding))
    return parsed


def matmul_peak_gflops(threads: int, n: int = 1024) -> float:
    """This machine's fp32 matmul throughput, (n x n) @ (n x n), median of torch.utils.benchmark runs."""
    from torch.utils import benchmark

    a, b = torch.randn(n, n), torch.randn(n, n)
    timer = benchmark.Timer(stmt="a @ b", globals={"a": a, "b": b}, num_threads=threads)
    return 2 * n**3 / timer.blocked_autorange(min_run_time=1.0).median / 1e9


def run_trainer(cfg: Any, steps: int, log_interval: int, threads: int, timeout: float) -> dict[str, Any]:
    """`tcompare train` of the resolved config in a fresh process; its logged step times (window means)."""
    from transformer_comparison.artifacts.run import read_metrics, train_records
    from transformer_comparison.config import save_config

    with tempfile.TemporaryDirectory(prefix="tcompare-bench-train-") as tmp:
        run_dir, config = Path(tmp) / "run", Path(tmp) / "config.yaml"
        save_config(cfg, config)
        command = [sys.executable, "-m", "transformer_comparison", "train", "--out", str(run_dir), "--config", str(config),
                   f"training.max_steps={steps}", f"training.eval_interval={steps}", "training.eval_batches=1",
                   "training.checkpoint_interval=0", f"logging.log_interval={log_interval}",
                   "logging.wandb=disabled", "logging.progress=false"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "timeout"}
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            return {"status": (lines[-1] if lines else f"exit status {done.returncode}")[:300]}
        records = train_records(read_metrics(run_dir))
        return {"status": "ok", "window_step_ms": [r.step_time_ms for r in records],
                "final_train_loss": records[-1].train_loss if records else None, "keeps_freed_memory": glibc() is not None}


def flops_per_token(cfg: Any, vocab_size: int, reference: bool) -> float:
    """6 N + 12 L d T with N the non-embedding parameters (the trainer's own formula, for both models)."""
    from transformer_comparison.bench.reference_gpt import NanoGPT
    from transformer_comparison.model import build_model

    m = cfg.model
    if not reference:
        return float(build_model(cfg, vocab_size).flops_per_token())
    model = NanoGPT(vocab_size, m.context_length, m.d_model, m.num_heads, m.num_layers, m.bias)
    non_embedding = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel() - model.wpe.weight.numel()
    return float(6 * non_embedding + 12 * m.num_layers * m.d_model * m.context_length)


def run(args: argparse.Namespace) -> int:
    from transformer_comparison.config import load_config, with_overrides
    from transformer_comparison.data import prepare_data

    for name in ("steps", "repeats", "log_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup_windows < 0 or args.steps // args.log_interval <= args.warmup_windows:
        raise UserError(f"--steps {args.steps} gives {args.steps // args.log_interval} windows of --log_interval "
                        f"{args.log_interval}; more than --warmup_windows {args.warmup_windows} are needed")
    cells = parse_cells(args.cells)
    cfg = load_config(args.config, args.overrides)
    threads = args.threads or torch.get_num_threads()
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    vocab_size = cfg.model.vocab_size or prepare_data(cfg.data).tokenizer.vocab_size
    tokens_per_step = cfg.training.batch_size * cfg.training.gradient_accumulation_steps * cfg.model.context_length
    peak = matmul_peak_gflops(threads)
    reference_memory = "keeps freed memory, as the trainer does" if args.reference_keeps_freed_memory else "glibc's defaults"
    print(f"tcompare bench train: {threads} threads, fp32 matmul peak {peak:.1f} GFLOP/s; {args.repeats} x "
          f"(reference + {len(cells)} cells) x {args.steps} steps; reference allocator: {reference_memory}", file=sys.stderr)

    implementations = [(REFERENCE, "", "")] + [(f"tcompare:{m}+{p}", m, p) for m, p in cells]
    rows: list[TrainBenchRow] = []
    for repeat in range(args.repeats):
        for name, mechanism, encoding in implementations:
            cell_cfg = cfg if not mechanism else with_overrides(cfg, [f"attention.type={mechanism}", f"position.type={encoding}"])
            if not mechanism:
                case = {"config": cfg.model_dump(mode="json"), "steps": args.steps, "log_interval": args.log_interval,
                        "threads": threads, "keep_freed_memory": args.reference_keeps_freed_memory}
                result = run_child("transformer_comparison.bench.reference_gpt", case, RESULT_PREFIX, args.timeout)
            else:
                result = run_trainer(cell_cfg, args.steps, args.log_interval, threads, args.timeout)
            rows.append(make_row(name, mechanism, encoding, repeat, result, args, tokens_per_step, peak,
                                 flops_per_token(cell_cfg, vocab_size, reference=not mechanism), threads))
            print(f"  repeat {repeat + 1}: {name:<32} {format_ms(rows[-1].median_step_ms)} {rows[-1].status}",
                  file=sys.stderr, flush=True)
            write_csv(out_dir / "train_bench.csv", rows, TrainBenchRow)
    print_summary(rows)
    print(f"\nwrote {out_dir / 'train_bench.csv'}")
    return 0


def make_row(name: str, mechanism: str, encoding: str, repeat: int, result: dict[str, Any], args: argparse.Namespace,
             tokens_per_step: int, peak: float, flops: float, threads: int) -> TrainBenchRow:
    windows = result.get("window_step_ms") or []
    timed = windows[args.warmup_windows:]
    median = statistics.median(timed) if result["status"] == "ok" and timed else None
    tokens_per_second = tokens_per_step / (median / 1000) if median else None
    achieved = flops * tokens_per_second / 1e9 if tokens_per_second else None
    return TrainBenchRow(
        implementation=name, attention_type=mechanism or None, position_embedding=encoding or None, repeat=repeat,
        median_step_ms=median, tokens_per_second=tokens_per_second, achieved_gflops=achieved, peak_gflops=peak,
        fraction_of_peak=achieved / peak if achieved else None, windows=len(timed), steps=args.steps, threads=threads,
        final_train_loss=result.get("final_train_loss"), keeps_freed_memory=result.get("keeps_freed_memory"),
        status=result["status"],
    )


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms/step"


def print_summary(rows: list[TrainBenchRow]) -> None:
    """Per implementation: the median over repeats of its step time, and its ratio to the reference's, the
    median over repeats of the ratio within each repeat (a repeat's runs follow each other, so a
    machine that slows down for a while moves both sides of that repeat's ratio)."""
    import pandas as pd

    ok = pd.DataFrame([r.model_dump() for r in rows if r.median_step_ms is not None])
    if ok.empty:
        print("no run completed")
        return
    table = ok.groupby("implementation", sort=False).agg(
        median_step_ms=("median_step_ms", "median"), min_step_ms=("median_step_ms", "min"),
        max_step_ms=("median_step_ms", "max"), tokens_per_second=("tokens_per_second", "median"),
        fraction_of_peak=("fraction_of_peak", "median"), runs=("repeat", "count"))
    if REFERENCE in table.index:
        per_repeat = ok.pivot(index="repeat", columns="implementation", values="median_step_ms")
        table["ratio_to_reference"] = per_repeat.div(per_repeat[REFERENCE], axis=0).median()
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
