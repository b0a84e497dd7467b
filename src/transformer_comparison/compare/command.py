"""`tcompare compare`: the command line, the output directory, and the loop that reports each finished cell."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformer_comparison import report
from transformer_comparison.artifacts.comparison import (COMPARISON_FILE, CellRecord, Comparison, Environment, Grid,
                                                         read_comparison, write_comparison)
from transformer_comparison.artifacts.io import write_text_atomic
from transformer_comparison.compare.cells import CellJob, cell_action, read_summary_or_none
from transformer_comparison.compare.executors import LocalExecutor, RayExecutor, StopFlag, cuda_devices, default_threads
from transformer_comparison.compare.extras import PROBES, run_extras
from transformer_comparison.compare.plan import Cell, Plan, comma_list, count, make_plan
from transformer_comparison.compare.sweeps import split_sweep
from transformer_comparison.config import config_to_yaml, with_overrides
from transformer_comparison.data import prepare_data
from transformer_comparison.errors import UserError
from transformer_comparison.presets import PRESETS, Preset
from transformer_comparison.run_lock import lock_directory

EXECUTORS = ("local", "ray")
MATCHES = ("params",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="base YAML config for every cell (default: the built-in defaults)")
    parser.add_argument("--attention_types", type=comma_list, metavar="A,B,...", help="mechanisms to train (default: every registered one)")
    parser.add_argument("--position_embeddings", type=comma_list, metavar="X,Y,...", help="encodings to train (default: every registered one)")
    parser.add_argument("--seeds", default="1", metavar="N", help="runs per cell, with training.seed = base seed + 0..N-1, the base being the config's "
                        "training.seed (the override training.seed=1338 starts there) (default 1)")
    parser.add_argument("--sweep", action="append", type=split_sweep, metavar="KEY=V1,V2,...",
                        help="another axis of the grid: a config key and its values (repeatable), e.g. "
                             "--sweep training.learning_rate=5e-4,1e-3,2e-3; a single value sets the key for every run")
    parser.add_argument("--match", metavar="params", help="params: widen or narrow each mechanism's MLP until its non-embedding "
                        "parameters are within 1%% of dot_product's at the same config")
    parser.add_argument("--jobs", metavar="N", help="local: runs trained at once (default 1, for honest timings on CPU; --preset "
                        "quick: 2, one thread each); with several CUDA devices each run gets its own. ray: most tasks in flight")
    parser.add_argument("--executor", default="local", metavar="local|ray", help="where the runs train (default local)")
    parser.add_argument("--ray_address", metavar="ADDRESS", help="--executor ray: a running cluster (auto, or host:port); "
                        "default: a Ray instance on this machine")
    parser.add_argument("--cpus_per_cell", default="1", metavar="N", help="--executor ray: CPUs (and threads) per run (default 1)")
    parser.add_argument("--gpus_per_cell", default="0", metavar="G", help="--executor ray: GPUs per run (default 0)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default results/comparison-<hash of config and grid>)")
    parser.add_argument("--preset", metavar="NAME", help=f"overrides (and sweeps) applied on top of --config: {', '.join(PRESETS)}")
    parser.add_argument("--bench", action="store_true", help="after training, run `tcompare bench kernels` and `bench decode` into DIR/bench")
    parser.add_argument("--extrapolate", action="store_true", help="after training, run `tcompare eval` at longer lengths for every completed run")
    parser.add_argument("--probe", metavar="mqar", help="after training, run the recall probe (`tcompare probe mqar`) for the "
                        "grid's mechanisms and encodings into DIR/probe/mqar; the report gets a recall section")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every cell (applied last)")


# ----------------------------------------------------------------------------------------------
# checks of the flags that make_plan does not see


def check_choice(value: str | None, valid: tuple[str, ...], flag: str) -> None:
    if value is not None and value not in valid:
        raise UserError(f"{flag} {value!r} is not one of {', '.join(valid)}")


def jobs_for(args: argparse.Namespace, preset: Preset | None) -> int:
    if args.jobs is not None:
        return count(args.jobs, "--jobs")
    return max(1, min(preset.jobs, os.cpu_count() or 1)) if preset and preset.jobs else 1


def gpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise UserError(f"--gpus_per_cell={text!r} should be a number >= 0")
    return value


def make_executor(args: argparse.Namespace, jobs: int) -> LocalExecutor | RayExecutor:
    if args.executor == "ray":
        return RayExecutor(address=args.ray_address, cpus_per_cell=count(args.cpus_per_cell, "--cpus_per_cell"),
                           gpus_per_cell=gpus(args.gpus_per_cell), max_in_flight=jobs if args.jobs is not None else None)
    if args.ray_address:
        raise UserError("--ray_address needs --executor ray")
    return LocalExecutor(jobs=jobs, threads=default_threads(jobs), devices=cuda_devices(jobs))


# ----------------------------------------------------------------------------------------------
# the output directory


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """The keys whose values differ ("" when none). A key the stored config lacks was added to the
    program later, at a default that keeps the old behaviour: not a difference (as for checkpoints)."""
    a, b = _flatten(old), _flatten(new)
    keys = [key for key in sorted(a) if a.get(key) != b.get(key) and key not in ("attention.type", "position.type")]
    shown = ", ".join(f"{key} {a.get(key)!r} -> {b.get(key)!r}" for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def grid_differences(old: Grid, new: Grid) -> str:
    def text(value: Any) -> str:
        if isinstance(value, dict):
            return "; ".join(f"{k}={','.join(map(str, v))}" for k, v in value.items()) or "none"
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    a, b = old.model_dump(), new.model_dump()
    return "; ".join(f"{key} {text(a[key])} -> {text(b[key])}" for key in b if a[key] != b[key])


def grid_grows(old: Grid, new: Grid) -> bool:
    """Whether `new` keeps every run of `old` under the same name: the same swept keys, base seed and
    --match, and each list (mechanisms, encodings, every sweep's values) and the seed count only grown."""
    if (old.base_seed, old.match, set(old.sweep)) != (new.base_seed, new.match, set(new.sweep)) or new.seeds < old.seeds:
        return False
    lists = [(old.attention_types, new.attention_types), (old.position_embeddings, new.position_embeddings)]
    lists += [(values, new.sweep[key]) for key, values in old.sweep.items()]
    return all(set(before) <= set(after) for before, after in lists)


def check_output_dir(plan: Plan) -> Comparison | None:
    """The comparison already in plan.out (None: none); refuses a directory holding anything else."""
    out = plan.out
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose another --out")
    if not (out / COMPARISON_FILE).is_file():
        if any(not path.name.startswith(".") for path in out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no comparison.json; choose another --out")
        return None
    try:
        existing = read_comparison(out)
    except UserError as error:
        raise UserError(f"{error}; choose another --out") from None
    changed = config_differences(existing.config, plan.config.model_dump(mode="json"))
    if existing.config_hash != plan.config_hash and changed:
        raise UserError(f"--out {out} holds a different comparison (its config differs: {changed}); "
                        "use another --out, or the same config and overrides to resume it")
    grid = plan.grid()
    if existing.grid != grid:
        differences = grid_differences(existing.grid, grid)
        if not grid_grows(existing.grid, grid):
            raise UserError(f"--out {out} holds a different comparison (its grid differs: {differences}); "
                            "use another --out, or the same --attention_types/--position_embeddings/--sweep/--seeds to resume it "
                            "(a grid may grow: more mechanisms, encodings, sweep values or seeds)")
        print(f"--out {out}: the grid grows ({differences}); its finished runs are kept", flush=True)
    return existing


def command_line(args: argparse.Namespace) -> str:
    parts = ["tcompare", "compare"]
    for flag in ("config", "attention_types", "position_embeddings", "seeds", "jobs", "out", "preset", "match", "executor",
                 "ray_address", "probe"):
        value = getattr(args, flag)
        if value is not None and not (flag == "executor" and value == "local"):
            parts += [f"--{flag}", ",".join(value) if isinstance(value, list) else str(value)]
    for key, values in args.sweep or []:
        parts += ["--sweep", f"{key}={','.join(values)}"]
    parts += [flag for flag in ("--bench", "--extrapolate") if getattr(args, flag.lstrip("-"))]
    return shlex.join(parts + list(args.overrides))


def environment(executor: str) -> Environment:
    import torch

    ray_version = None
    if executor == "ray":
        import ray

        ray_version = ray.__version__
    return Environment(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
                       torch=torch.__version__, cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                       ray=ray_version)


def threads_text(executor: LocalExecutor | RayExecutor) -> int | str:
    if isinstance(executor, RayExecutor):
        return executor.cpus_per_cell
    return executor.threads or os.environ.get("OMP_NUM_THREADS") or "default"


def prepare_output_dir(plan: Plan, existing: Comparison | None, command: str, jobs: int = 1,
                       executor: LocalExecutor | RayExecutor | None = None) -> Comparison:
    executor = executor or LocalExecutor(jobs=jobs)
    (plan.out / "runs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan.config_path, config_to_yaml(plan.config))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    comparison = Comparison(
        name=existing.name if existing else f"{plan.out.name}-{plan.config_hash[:8]}",
        preset=plan.preset.name if plan.preset else None, scale=plan.preset.scale if plan.preset else "full",
        note=plan.preset.note if plan.preset else None, config_hash=plan.config_hash, grid=plan.grid(),
        cells=[cell.entry() for cell in plan.cells], skipped=plan.skipped, budget=plan.budget,  # type: ignore[arg-type]
        config_file=str(plan.config_file) if plan.config_file else None, overrides=plan.overrides,
        config=plan.config.model_dump(mode="json"), command=command, jobs=jobs, threads_per_job=threads_text(executor),
        executor=executor.name, created=(existing.created if existing else None) or now, updated=now,
        environment=environment(executor.name),
    )
    write_comparison(plan.out, comparison)
    return comparison


# ----------------------------------------------------------------------------------------------
# running


def check_data(plan: Plan) -> None:
    """Prepare, before anything is written, the data of every run still to train, once per distinct data
    section and vocabulary (a sweep may change them): a missing or unreadable dataset is then one error,
    not a failure in every cell (which then find the tokens cached). A finished grid rebuilds its report
    without the data."""
    prepared = set()
    for cell in plan.cells:
        if cell_action(plan.run_dir(cell)) == "skip":
            continue
        cfg = with_overrides(plan.config, cell.sweep_overrides)
        key = (cfg.data.model_dump_json(), cfg.model.vocab_size)
        if key not in prepared:
            prepare_data(cfg.data, cfg.model.vocab_size)
            prepared.add(key)


def cell_job(plan: Plan, cell: Cell, group: str, executor: str) -> CellJob:
    run_dir = plan.run_dir(cell).resolve()
    config = str(plan.config_path.resolve())
    fresh = ["train", "--config", config, "--attention_type", cell.attention_type, "--position_embedding", cell.position_embedding,
             "--out", str(run_dir), "--overwrite",  # the directory is the comparison's: a retry starts clean
             "--wandb_group", group, *cell.overrides()]
    resume = ["train", "--resume", str(run_dir), "--wandb_group", group]
    return CellJob(name=cell.name, attention_type=cell.attention_type, position_embedding=cell.position_embedding, seed=cell.seed,
                   out=str(plan.out.resolve()), fresh_args=fresh, resume_args=resume, sweep=cell.sweep, executor=executor,
                   death_signal=signal.SIGKILL if executor == "ray" else signal.SIGTERM)


def describe(record: CellRecord, run_dir: Path) -> str:
    summary = read_summary_or_none(run_dir)
    if record.status == "completed" and summary is not None:
        loss = f"{summary.final_val_loss:.4f}" if summary.final_val_loss is not None else "nan"
        speed = f", {summary.tokens_per_second:,.0f} tok/s" if summary.tokens_per_second is not None else ""
        return f"val loss {loss}{speed}, {record.wall_seconds:.0f} s"
    return f"{record.status.upper()}: {record.error}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def seconds_left(walls: dict[str, list[float]], pending: Counter, jobs: int) -> float:
    """Expected wall time of the pending runs (a count per mechanism), `jobs` at a time: each run takes
    the mean of its mechanism's finished runs, or of all finished runs for a mechanism not seen yet
    (mechanisms differ 2-3x in speed, and a grid trains them one after another)."""
    every = [wall for mechanism_walls in walls.values() for wall in mechanism_walls]
    overall = sum(every) / len(every)
    expected = {mechanism: sum(w) / len(w) for mechanism, w in walls.items()}
    return sum(expected.get(mechanism, overall) * count for mechanism, count in pending.items()) / jobs


def run_cells(plan: Plan, comparison: Comparison, executor: LocalExecutor | RayExecutor, jobs: int, stop: StopFlag) -> Counter:
    counts: Counter = Counter()
    todo = []
    for cell in plan.cells:
        action = cell_action(plan.run_dir(cell))
        counts["skipped" if action == "skip" else action] += 1
        if action != "skip":
            todo.append(cell_job(plan, cell, comparison.name, executor.name))
    total = len(plan.cells)
    print(f"comparison {comparison.name}: {total} runs, {counts['skipped']} completed earlier, {counts['resume']} to resume, "
          f"{counts['fresh']} to train; {executor.describe()} -> {plan.out}", flush=True)
    started, done = time.perf_counter(), counts["skipped"]
    walls: dict[str, list[float]] = defaultdict(list)  # per mechanism, this invocation's finished runs
    pending = Counter(job.attention_type for job in todo)

    def finished(job: CellJob, record: CellRecord) -> None:
        nonlocal done
        counts[record.status] += 1
        done += 1
        walls[job.attention_type].append(record.wall_seconds)
        pending[job.attention_type] -= 1
        report.write_results(plan.out)
        left = total - done
        eta = f"; about {duration(seconds_left(walls, pending, jobs))} left" if left and stop.signum is None else ""
        print(f"[{done}/{total}] {job.name}: {describe(record, job.run_dir)} "
              f"(elapsed {duration(time.perf_counter() - started)}{eta})", flush=True)

    executor.run(todo, finished, stop)
    return counts


def run(args: argparse.Namespace) -> int:
    check_choice(args.executor, EXECUTORS, "--executor")
    check_choice(args.match, MATCHES, "--match")
    check_choice(args.probe, PROBES, "--probe")
    plan = make_plan(args)
    jobs = jobs_for(args, plan.preset)
    executor = make_executor(args, jobs)
    if isinstance(executor, RayExecutor):
        from transformer_comparison.compare.executors import import_ray

        import_ray()  # a missing Ray is an error before anything is written
    existing = check_output_dir(plan)
    check_data(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    with lock_directory(plan.out, "comparison directory"), StopFlag() as stop:  # one `tcompare compare` per directory
        comparison = prepare_output_dir(plan, existing, command_line(args), jobs, executor)
        report.write_results(plan.out)
        counts = run_cells(plan, comparison, executor, jobs, stop)
        if stop.signum is None and (args.bench or args.extrapolate or args.probe):
            extras = run_extras(plan, args.bench, args.extrapolate, args.probe)
            write_text_atomic(plan.out / "extras.json", json.dumps(extras, indent=2) + "\n")
        report.write_results(plan.out)
        md_path, html_path = report.build_report(plan.out)
    print(f"results: {plan.out / 'results.csv'}; report: {md_path} and {html_path}", flush=True)
    if stop.signum is not None:
        print(f"tcompare compare: interrupted; run the same command again to resume {plan.out}", file=sys.stderr)
        return 143 if stop.signum == signal.SIGTERM else 130
    bad = counts["failed"] + counts["interrupted"]
    if bad:
        print(f"tcompare compare: {bad} of {len(plan.cells)} runs did not complete (see the report); "
              "run the same command again to retry them", file=sys.stderr)
        return 1
    return 0
