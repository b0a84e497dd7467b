"""--bench / --extrapolate: optional steps after training, recorded in DIR/extras.json (never fatal).

--bench runs `tcompare bench kernels` at the trained models' head count and head size, for lengths
of 1 to 16 context lengths, and `bench decode` on the first completed run, into DIR/bench/;
--extrapolate runs `tcompare eval` at 1, 2, 4 and 8 context lengths for every completed run;
--probe mqar runs the recall probe (`tcompare probe mqar`, docs/probe.md) for the grid's mechanisms
and encodings into DIR/probe/mqar/, with the comparison's mechanism options (its attention.* and
position.* overrides) and the probe's own budget (its quick preset under --preset quick). A step
that is not installed, or fails, is listed in the report; the comparison goes on.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformer_comparison.compare.cells import cell_action, last_line
from transformer_comparison.compare.plan import Plan
from transformer_comparison.config import Config, kernel_options_for, with_overrides
from transformer_comparison.errors import UserError

EXTRAPOLATION_FACTORS = (1, 2, 4, 8)  # eval lengths, in multiples of the context length
EVAL_TOKENS = 262_144  # windows per length so that the longest scores about this many tokens
KERNEL_LENGTH_FACTORS = (1, 2, 4, 8, 16)  # kernel sequence lengths, in multiples of the context length


def available(command: str, module: str) -> bool:
    from transformer_comparison.cli import COMMANDS

    if command not in COMMANDS:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def bench_available(name: str) -> bool:
    try:
        from transformer_comparison.bench import BENCHMARKS
    except ImportError:
        return False
    return name in BENCHMARKS and available("bench", BENCHMARKS[name][0])


def kernel_option_overrides(cfg: Config, mechanisms: list[str]) -> list[str]:
    """Each mechanism's options in the comparison's config, as `bench kernels` overrides
    (attention.<mechanism>.<option>=value), so the kernels are timed as the grid trained them."""
    overrides = []
    for mechanism in mechanisms:
        options = kernel_options_for(with_overrides(cfg, [f"attention.type={mechanism}"]))
        overrides += [f"attention.{mechanism}.{name}={value}" for name, value in options.items() if value is not None]
    return overrides


def kernel_bench_arguments(plan: Plan, out_dir: Path) -> list[str]:
    cfg = plan.config
    lengths = ",".join(str(cfg.model.context_length * factor) for factor in KERNEL_LENGTH_FACTORS)
    device = "auto" if cfg.training.device == "auto" else cfg.training.device.split(":")[0]
    return ["--out", str(out_dir), "--lengths", lengths, "--heads", str(cfg.model.num_heads),
            "--head_dim", str(cfg.model.d_model // cfg.model.num_heads), "--device", device,
            "--mechanisms", ",".join(plan.attention_types), *kernel_option_overrides(cfg, plan.attention_types)]


def eval_arguments(cfg: Config) -> list[str]:
    """`eval` at 1, 2, 4 and 8 times the context length, at most ~256k scored tokens per length."""
    lengths = [cfg.model.context_length * factor for factor in EXTRAPOLATION_FACTORS]
    return ["--lengths", ",".join(map(str, lengths)), "--max_windows", str(max(1, EVAL_TOKENS // max(lengths)))]


def run_extra(out: Path, name: str, command: list[str], log_path: Path) -> dict[str, Any]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}: running ({log_path})", flush=True)
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"# tcompare compare: {shlex.join(command)}\n")
        log.flush()
        offset = log.tell()
        returncode = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False).returncode
    wall = round(time.perf_counter() - started, 3)
    status = "completed" if returncode == 0 else "failed"
    error = None if returncode == 0 else f"exit {returncode}: {last_line(log_path, offset) or 'no output'}"
    print(f"{name}: {status}" + (f" ({error})" if error else f" in {wall:.0f} s"), flush=True)
    return {"name": name, "status": status, "error": error, "command": shlex.join(command),
            "log": str(log_path.relative_to(out)), "wall_seconds": wall}


def _existing(name: str, log: str, what: str) -> dict[str, Any]:
    return {"name": name, "status": "completed", "error": None, "command": None, "log": log, "note": f"{what} existed; not rerun"}


def _unavailable(name: str, why: str) -> dict[str, Any]:
    print(f"{name}: skipped ({why})", flush=True)
    return {"name": name, "status": "unavailable", "error": why, "command": None, "log": None}


def bench_steps(plan: Plan, completed: list[Path]) -> list[dict[str, Any]]:
    out, python = plan.out, [sys.executable, "-m", "transformer_comparison"]
    bench_dir = out / "bench"
    records = []
    if not bench_available("kernels"):
        records.append(_unavailable("bench kernels", "`tcompare bench kernels` is not available in this installation"))
    elif (bench_dir / "kernels.csv").is_file():
        records.append(_existing("bench kernels", "bench/kernels.log", "kernels.csv"))
    else:
        command = python + ["bench", "kernels", *kernel_bench_arguments(plan, bench_dir)]
        records.append(run_extra(out, "bench kernels", command, bench_dir / "kernels.log"))
    if not bench_available("decode"):
        records.append(_unavailable("bench decode", "`tcompare bench decode` is not available in this installation"))
    elif not completed:
        records.append(_unavailable("bench decode", "no completed run to benchmark"))
    elif (bench_dir / "decode.csv").is_file():
        records.append(_existing("bench decode", "bench/decode.log", "decode.csv"))
    else:
        command = python + ["bench", "decode", "--run", str(completed[0]), "--out", str(bench_dir)]
        records.append(run_extra(out, "bench decode", command, bench_dir / "decode.log"))
    return records


def eval_steps(plan: Plan, completed: list[Path]) -> list[dict[str, Any]]:
    if not available("eval", "transformer_comparison.evaluate"):
        return [_unavailable("eval (extrapolation)", "`tcompare eval` is not available in this installation")]
    records, lengths = [], eval_arguments(plan.config)
    for run_dir in completed:
        name = f"eval {run_dir.name}"
        if (run_dir / "extrapolation.csv").is_file():
            records.append(_existing(name, f"runs/{run_dir.name}/eval.log", "extrapolation.csv"))
        else:
            command = [sys.executable, "-m", "transformer_comparison", "eval", "--run", str(run_dir), *lengths]
            records.append(run_extra(plan.out, name, command, run_dir / "eval.log"))
    return records


PROBES = ("mqar",)
PROBE_SECTIONS = ("attention.", "position.")  # the overrides the probe takes from the comparison


def probe_step(plan: Plan, name: str) -> dict[str, Any]:
    """The recall probe for the grid's mechanisms and encodings, into DIR/probe/<name>/."""
    label = f"probe {name}"
    try:
        from transformer_comparison.probe import ProbeSettings, run_probe
        from transformer_comparison.probe.settings import with_preset
    except ImportError:
        return _unavailable(label, "`tcompare probe` is not available in this installation")
    quick = plan.preset is not None and plan.preset.scale == "smoke"
    options = tuple(o for o in (*(plan.preset.overrides if plan.preset else ()), *plan.overrides) if o.startswith(PROBE_SECTIONS))
    settings = with_preset(ProbeSettings(), "quick" if quick else None)
    settings = replace(settings, attention_types=tuple(plan.attention_types), position_embeddings=tuple(plan.position_embeddings),
                       config_path=plan.config_file, overrides=options)
    out_dir = plan.out / "probe" / name
    print(f"{label}: running into {out_dir}", flush=True)
    started = time.perf_counter()
    try:
        run_probe(settings, out_dir)
    except UserError as error:
        print(f"{label}: failed ({error})", flush=True)
        return {"name": label, "status": "failed", "error": str(error), "command": None, "log": None}
    return {"name": label, "status": "completed", "error": None, "command": None, "log": f"probe/{name}/mqar.csv",
            "wall_seconds": round(time.perf_counter() - started, 3)}


def run_extras(plan: Plan, bench: bool, extrapolate: bool, probe: str | None = None) -> list[dict[str, Any]]:
    completed = [plan.run_dir(cell) for cell in plan.cells if cell_action(plan.run_dir(cell)) == "skip"]
    records = (bench_steps(plan, completed) if bench else []) + (eval_steps(plan, completed) if extrapolate else [])
    return records + ([probe_step(plan, probe)] if probe else [])
