"""`tcompare compare`: train the attention-mechanism x positional-encoding grid, then write a report.

    tcompare compare --config configs/config.yaml --preset quick --out results/quick
    tcompare compare --config configs/config.yaml --attention_types dot_product,local --seeds 3 --jobs 2 \
        training.max_steps=500

Every cell (mechanism, encoding, seed) gets the same resolved config except attention.type,
position.type and training.seed (base seed + 0, 1, ..., N-1), and is trained by its own
`tcompare train` process into DIR/runs/<attention>-<position>-seed<S>/ (output in train.log there).
DIR/comparison.json records the grid and a hash of the resolved config; running the same command
again skips completed runs, resumes checkpointed ones and retries failed ones, and an output
directory holding a different comparison is refused. Results (results.csv/json, aggregate.csv) are
rewritten after every finished cell; report.md / report.html at the end (`tcompare report DIR`
rebuilds them).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TextIO

from transformer_comparison import report
from transformer_comparison.attention import ATTENTION_TYPES
from transformer_comparison.config import Config, config_to_yaml, load_config, with_overrides
from transformer_comparison.errors import UserError
from transformer_comparison.position import POSITION_TYPES
from transformer_comparison.presets import PRESETS, Preset, get_preset

FORMAT_VERSION = 1
# Applied before the preset and the user's overrides: a child's progress bar is noise in train.log.
COMPARE_DEFAULTS: tuple[str, ...] = ("logging.progress=false",)
PER_CELL_KEYS = ("attention.type", "position.type")
EXTRAPOLATION_FACTORS = (1, 2, 4, 8)  # --extrapolate: eval lengths, in multiples of the context length
EVAL_TOKENS = 262_144  # --extrapolate: windows per length so that the longest scores about this many tokens
KERNEL_LENGTH_FACTORS = (1, 2, 4, 8, 16)  # --bench: kernel sequence lengths, in multiples of the context length
POLL_SECONDS = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="base YAML config for every cell (default: the built-in defaults)")
    parser.add_argument("--attention_types", metavar="A,B,...", help=f"mechanisms to train (default all: {','.join(ATTENTION_TYPES)})")
    parser.add_argument("--position_embeddings", metavar="X,Y,...", help=f"encodings to train (default all: {','.join(POSITION_TYPES)})")
    parser.add_argument("--seeds", default="1", metavar="N", help="runs per cell, with training.seed = base seed + 0..N-1 (default 1)")
    parser.add_argument("--jobs", metavar="N", help="runs trained at once (default 1, for honest timings on CPU; --preset quick: 2, "
                        "one thread each); with several CUDA devices each run gets its own")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default results/comparison-<hash of config and grid>)")
    parser.add_argument("--preset", metavar="NAME", help=f"overrides applied on top of --config: {', '.join(PRESETS)}")
    parser.add_argument("--bench", action="store_true", help="after training, run `tcompare bench kernels` and `bench decode` into DIR/bench")
    parser.add_argument("--extrapolate", action="store_true", help="after training, run `tcompare eval` at longer lengths for every completed run")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every cell (applied last)")


# ----------------------------------------------------------------------------------------------
# the plan: everything validated before anything is written


@dataclass(frozen=True)
class Cell:
    attention_type: str
    position_embedding: str
    seed: int  # the training seed

    @property
    def name(self) -> str:
        return f"{self.attention_type}-{self.position_embedding}-seed{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attention_type": self.attention_type, "position_embedding": self.position_embedding, "seed": self.seed}


@dataclass
class Plan:
    out: Path
    config: Config
    config_hash: str
    attention_types: list[str]
    position_embeddings: list[str]
    seeds: int
    preset: Preset | None
    config_file: Path | None
    overrides: list[str]
    cells: list[Cell] = field(default_factory=list)

    @property
    def base_seed(self) -> int:
        return self.config.training.seed

    def grid(self) -> dict[str, Any]:
        return {
            "attention_types": self.attention_types,
            "position_embeddings": self.position_embeddings,
            "seeds": self.seeds,
            "base_seed": self.base_seed,
        }

    @property
    def config_path(self) -> Path:
        return self.out / "comparison_config.yaml"

    def run_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.name


def parse_names(text: str | None, valid: tuple[str, ...], flag: str) -> list[str]:
    """A comma-separated list of names from `valid`, in `valid`'s order; None: all of them."""
    if text is None:
        return list(valid)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise UserError(f"unknown name{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {flag}; valid: {', '.join(valid)}")
    if not names:
        raise UserError(f"{flag} is empty, so the grid has no cells; valid: {', '.join(valid)}")
    return [name for name in valid if name in names]


def parse_count(text: str, flag: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{flag}={text!r} should be a whole number >= 1") from None
    if value < 1:
        raise UserError(f"{flag}={value} should be >= 1")
    return value


def jobs_for(args: argparse.Namespace, preset: Preset | None) -> int:
    if args.jobs is not None:
        return parse_count(args.jobs, "--jobs")
    return max(1, min(preset.jobs, os.cpu_count() or 1)) if preset and preset.jobs else 1


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config, without the keys that differ per cell."""
    data = cfg.model_dump(mode="json")
    data["attention"].pop("type", None)
    data["position"].pop("type", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def make_plan(args: argparse.Namespace) -> Plan:
    attention_types = parse_names(args.attention_types, ATTENTION_TYPES, "--attention_types")
    position_embeddings = parse_names(args.position_embeddings, POSITION_TYPES, "--position_embeddings")
    seeds = parse_count(args.seeds, "--seeds")
    preset = get_preset(args.preset) if args.preset else None
    jobs_for(args, preset)
    for override in args.overrides:
        key = override.partition("=")[0].strip()
        if key in PER_CELL_KEYS:
            flag = "--attention_types" if key == "attention.type" else "--position_embeddings"
            raise UserError(f"{key} is set per cell by the grid; choose the values with {flag}, not an override")
    overrides = [*COMPARE_DEFAULTS, *(preset.overrides if preset else ()), *args.overrides]
    # the base config is that of the first cell; the others differ in attention.type and position.type only
    base = load_config(args.config, overrides, attention_types[0], position_embeddings[0])
    digest = config_hash(base)
    plan = Plan(
        out=args.out or Path("results"),  # replaced below when not given
        config=base,
        config_hash=digest,
        attention_types=attention_types,
        position_embeddings=position_embeddings,
        seeds=seeds,
        preset=preset,
        config_file=args.config,
        overrides=list(args.overrides),
    )
    if args.out is None:  # the grid too decides the default directory, so another grid gets another one
        grid_digest = hashlib.sha256(json.dumps([digest, plan.grid()], sort_keys=True).encode()).hexdigest()
        plan.out = Path("results") / f"comparison-{grid_digest[:8]}"
    plan.cells = [
        Cell(a, p, plan.base_seed + i) for a in attention_types for p in position_embeddings for i in range(seeds)
    ]
    for a in attention_types:  # cross-field rules that depend on the cell (rope's even head dim, gqa's heads)
        for p in position_embeddings:
            try:
                with_overrides(base, [f"attention.type={a}", f"position.type={p}"])
            except UserError as error:
                raise UserError(f"cell {a} x {p}: {error}") from None
    return plan


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key) and key not in PER_CELL_KEYS]
    shown = ", ".join(f"{key} {a.get(key)!r} -> {b.get(key)!r}" for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _grid_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check_output_dir(plan: Plan) -> dict[str, Any] | None:
    """The comparison already in plan.out (None: none); refuses a directory holding anything else."""
    out = plan.out
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose another --out")
    marker = out / "comparison.json"
    if not marker.is_file():
        if any(not path.name.startswith(".") for path in out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no comparison.json; choose another --out")
        return None
    try:
        existing = json.loads(marker.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {marker}: {error}; choose another --out") from None
    if existing.get("config_hash") != plan.config_hash:
        changed = config_differences(existing.get("config") or {}, plan.config.model_dump(mode="json"))
        raise UserError(f"--out {out} holds a different comparison (its config differs: {changed or 'unknown keys'}); "
                        "use another --out, or the same config and overrides to resume it")
    if existing.get("grid") != plan.grid():
        old, new = existing.get("grid") or {}, plan.grid()
        changed = "; ".join(f"{key} {_grid_value(old.get(key))} -> {_grid_value(new.get(key))}" for key in new if old.get(key) != new.get(key))
        raise UserError(f"--out {out} holds a different comparison (its grid differs: {changed}); "
                        "use another --out, or the same --attention_types/--position_embeddings/--seeds to resume it")
    return existing


def command_line(args: argparse.Namespace) -> str:
    parts = ["tcompare", "compare"]
    for flag in ("config", "attention_types", "position_embeddings", "seeds", "jobs", "out", "preset"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag}", str(value)]
    parts += [flag for flag in ("--bench", "--extrapolate") if getattr(args, flag.lstrip("-"))]
    return shlex.join(parts + list(args.overrides))


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def prepare_output_dir(plan: Plan, existing: dict[str, Any] | None, command: str, jobs: int = 1) -> dict[str, Any]:
    (plan.out / "runs").mkdir(parents=True, exist_ok=True)
    report.write_atomic(plan.config_path, config_to_yaml(plan.config))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    comparison = {
        "format": FORMAT_VERSION,
        "name": (existing or {}).get("name") or f"{plan.out.name}-{plan.config_hash[:8]}",
        "preset": plan.preset.name if plan.preset else None,
        "scale": plan.preset.scale if plan.preset else "full",
        "note": plan.preset.note if plan.preset else None,
        "config_hash": plan.config_hash,
        "grid": plan.grid(),
        "cells": [cell.as_dict() for cell in plan.cells],
        "config_file": str(plan.config_file) if plan.config_file else None,
        "overrides": plan.overrides,
        "config": plan.config.model_dump(mode="json"),
        "command": command,
        "jobs": jobs,
        "threads_per_job": child_environment(jobs, None).get("OMP_NUM_THREADS") or "default",
        "created": (existing or {}).get("created") or now,
        "updated": now,
        "environment": environment(),
    }
    report.write_atomic(plan.out / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    return comparison


# ----------------------------------------------------------------------------------------------
# running the cells


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cell_action(run_dir: Path) -> str:
    """What a run needs: skip (completed), resume (it has a checkpoint) or fresh (new or failed).

    A diverged run starts again from scratch (resuming would diverge again, exactly), and so does a
    run whose last attempt was a resume that failed (e.g. an unreadable checkpoint).
    """
    summary = read_json(run_dir / "summary.json")
    if summary and summary.get("status") == "completed":
        return "skip"
    record = read_json(run_dir / "cell.json") or {}
    failed_resume = record.get("status") == "failed" and record.get("action") == "resume"
    diverged = bool(summary) and summary.get("status") == "diverged"
    if (run_dir / "checkpoints" / "latest.pt").is_file() and not (diverged or failed_resume):
        return "resume"
    return "fresh"


def train_command(plan: Plan, cell: Cell, action: str, group: str) -> list[str]:
    command = [sys.executable, "-m", "transformer_comparison", "train"]
    run_dir = plan.run_dir(cell)
    if action == "resume":
        return command + ["--resume", str(run_dir), "--wandb_group", group]
    return command + [
        "--config", str(plan.config_path),
        "--attention_type", cell.attention_type,
        "--position_embedding", cell.position_embedding,
        "--out", str(run_dir),
        "--overwrite",  # the directory is the comparison's: a retry starts clean (it may hold train.log)
        "--wandb_group", group,
        f"training.seed={cell.seed}",
    ]


def last_line(path: Path, offset: int) -> str:
    """The last non-empty line written to a log after `offset` (a progress bar's \\r updates split too)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [part.strip() for line in text.splitlines() for part in line.split("\r") if part.strip()]
    return lines[-1] if lines else ""


@dataclass
class Launch:
    cell: Cell
    action: str
    process: subprocess.Popen
    log: TextIO
    log_offset: int
    started: float
    slot: str | None
    command: list[str]


def child_environment(jobs: int, slot: str | None) -> dict[str, str]:
    """Unbuffered output; with several jobs, a share of the CPU threads (unless set) and one GPU each."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    return env


def launch(plan: Plan, cell: Cell, action: str, group: str, slot: str | None, jobs: int) -> Launch:
    run_dir = plan.run_dir(cell)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(plan, cell, action, group)
    log = (run_dir / "train.log").open("a", encoding="utf-8")
    stamp = datetime.now().isoformat(timespec="seconds")
    log.write(f"# tcompare compare, {stamp}, {action}: {shlex.join(command)}\n")
    log.flush()
    offset = log.tell()
    env = child_environment(jobs, slot)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Launch(cell, action, process, log, offset, time.perf_counter(), slot, command)


def finish(plan: Plan, item: Launch, returncode: int) -> dict[str, Any]:
    """Record a finished process as DIR/runs/<name>/cell.json (what the results and the report read)."""
    item.log.close()
    run_dir = plan.run_dir(item.cell)
    wall = time.perf_counter() - item.started
    summary = read_json(run_dir / "summary.json")
    status, error = "completed", None
    if returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        status, error = "interrupted", f"interrupted (exit {returncode}); run the same command again to resume"
    elif returncode != 0:
        status, error = "failed", f"exit {returncode}: {last_line(run_dir / 'train.log', item.log_offset) or 'no output'}"
    elif summary is None:
        status, error = "failed", "train exited 0 but wrote no summary.json"
    elif summary.get("status") != "completed":
        status, error = "failed", f"summary.json says {summary.get('status')}: {summary.get('error')}"
    previous = read_json(run_dir / "cell.json") or {}
    record = {
        **item.cell.as_dict(),
        "status": status,
        "error": error,
        "returncode": returncode,
        "action": item.action,
        "wall_seconds": round(wall, 3),
        "total_wall_seconds": round(wall + float(previous.get("total_wall_seconds") or 0.0), 3),
        "attempts": int(previous.get("attempts") or 0) + 1,
        "command": shlex.join(item.command),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report.write_atomic(run_dir / "cell.json", json.dumps(record, indent=2) + "\n")
    return record


def device_slots(jobs: int) -> list[str | None]:
    """One CUDA device per concurrent job when several are visible; otherwise no pinning."""
    if jobs < 2:
        return [None]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return [None] * jobs
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible[:count] if visible else [str(i) for i in range(count)]
    return [ids[i % len(ids)] for i in range(jobs)]


class StopFlag:
    """SIGINT/SIGTERM: forward to the running trainers (they checkpoint and exit), start no more cells."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.running: list[Launch] = []
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def request(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        for item in self.running:
            if item.process.poll() is None:
                try:
                    item.process.send_signal(signum)
                except ProcessLookupError:
                    pass


def describe(record: dict[str, Any], summary: dict[str, Any] | None) -> str:
    if record["status"] == "completed" and summary:
        loss = summary.get("final_val_loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "nan"
        speed = summary.get("tokens_per_second")
        speed_text = f", {speed:,.0f} tok/s" if isinstance(speed, (int, float)) and math.isfinite(speed) else ""
        return f"val loss {loss_text}{speed_text}, {record['wall_seconds']:.0f} s"
    return f"{record['status'].upper()}: {record['error']}"


def run_cells(plan: Plan, comparison: dict[str, Any], jobs: int, stop: StopFlag) -> dict[str, int]:
    group = comparison["name"]
    counts = {"skipped": 0, "completed": 0, "failed": 0, "interrupted": 0}
    queue: deque[tuple[Cell, str]] = deque()
    for cell in plan.cells:
        action = cell_action(plan.run_dir(cell))
        if action == "skip":
            counts["skipped"] += 1
        else:
            queue.append((cell, action))
    total = len(plan.cells)
    resumed = sum(1 for _, action in queue if action == "resume")
    print(f"comparison {group}: {total} runs, {counts['skipped']} completed earlier, {resumed} to resume, "
          f"{len(queue) - resumed} to train; {jobs} at a time -> {plan.out}", flush=True)
    free_slots = device_slots(jobs)
    started = time.perf_counter()
    done = counts["skipped"]
    walls: list[float] = []
    while queue or stop.running:
        while queue and len(stop.running) < jobs and stop.signum is None:
            cell, action = queue.popleft()
            stop.running.append(launch(plan, cell, action, group, free_slots.pop(0), jobs))
        finished = [item for item in stop.running if item.process.poll() is not None]
        if not finished:
            time.sleep(POLL_SECONDS)
            continue
        for item in finished:
            stop.running.remove(item)
            free_slots.append(item.slot)
            record = finish(plan, item, item.process.returncode)
            counts[record["status"]] += 1
            done += 1
            walls.append(record["wall_seconds"])
            report.write_results(plan.out)
            summary = read_json(plan.run_dir(item.cell) / "summary.json")
            eta = ""
            if queue and stop.signum is None:
                eta = f"; about {_duration(sum(walls) / len(walls) * len(queue) / jobs)} left"
            print(f"[{done}/{total}] {item.cell.name}: {describe(record, summary)} "
                  f"(elapsed {_duration(time.perf_counter() - started)}{eta})", flush=True)
        if stop.signum is not None and queue:
            queue.clear()
    return counts


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------------------------------------
# --bench / --extrapolate: optional sub-commands, recorded in DIR/extras.json


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


def kernel_bench_arguments(cfg: Config, out_dir: Path) -> list[str]:
    """`bench kernels` at the trained models' shape, from the context length up to 16 times it."""
    lengths = ",".join(str(cfg.model.context_length * factor) for factor in KERNEL_LENGTH_FACTORS)
    device = "auto" if cfg.training.device == "auto" else cfg.training.device.split(":")[0]
    return ["--out", str(out_dir), "--lengths", lengths, "--heads", str(cfg.model.num_heads),
            "--head_dim", str(cfg.model.d_model // cfg.model.num_heads), "--window", str(cfg.attention.window),
            "--top_k", str(cfg.attention.top_k), "--block_size", str(cfg.attention.block_size), "--device", device]


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
    print(f"{name}: {status}" + (f" ({error})" if error else f" in {_duration(wall)}"), flush=True)
    return {"name": name, "status": status, "error": error, "command": shlex.join(command),
            "log": str(log_path.relative_to(out)), "wall_seconds": wall}


def run_extras(plan: Plan, bench: bool, extrapolate: bool) -> list[dict[str, Any]]:
    out, python = plan.out, [sys.executable, "-m", "transformer_comparison"]
    completed = [cell for cell in plan.cells if cell_action(plan.run_dir(cell)) == "skip"]
    records: list[dict[str, Any]] = []

    def unavailable(name: str, why: str) -> None:
        print(f"{name}: skipped ({why})", flush=True)
        records.append({"name": name, "status": "unavailable", "error": why, "command": None, "log": None})

    if bench:
        bench_dir = out / "bench"
        if not bench_available("kernels"):
            unavailable("bench kernels", "`tcompare bench kernels` is not available in this installation")
        elif (bench_dir / "kernels.csv").is_file():
            records.append({"name": "bench kernels", "status": "completed", "error": None, "command": None,
                            "log": "bench/kernels.log", "note": "kernels.csv existed; not rerun"})
        else:
            command = python + ["bench", "kernels", *kernel_bench_arguments(plan.config, bench_dir)]
            records.append(run_extra(out, "bench kernels", command, bench_dir / "kernels.log"))
        if not bench_available("decode"):
            unavailable("bench decode", "`tcompare bench decode` is not available in this installation")
        elif not completed:
            unavailable("bench decode", "no completed run to benchmark")
        elif (bench_dir / "decode.csv").is_file():
            records.append({"name": "bench decode", "status": "completed", "error": None, "command": None,
                            "log": "bench/decode.log", "note": "decode.csv existed; not rerun"})
        else:
            run_dir = plan.run_dir(completed[0])
            records.append(run_extra(out, "bench decode", python + ["bench", "decode", "--run", str(run_dir), "--out", str(bench_dir)],
                                     bench_dir / "decode.log"))
    if extrapolate:
        if not available("eval", "transformer_comparison.evaluate"):
            unavailable("eval (extrapolation)", "`tcompare eval` is not available in this installation")
        else:
            lengths = eval_arguments(plan.config)
            for cell in completed:
                run_dir = plan.run_dir(cell)
                name = f"eval {cell.name}"
                if (run_dir / "extrapolation.csv").is_file():
                    records.append({"name": name, "status": "completed", "error": None, "command": None,
                                    "log": f"runs/{cell.name}/eval.log", "note": "extrapolation.csv existed; not rerun"})
                    continue
                records.append(run_extra(out, name, python + ["eval", "--run", str(run_dir), *lengths], run_dir / "eval.log"))
    return records


# ----------------------------------------------------------------------------------------------
# the command


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold DIR/.lock for the whole comparison, so that two `tcompare compare` never train the same runs."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with (out / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another `tcompare compare` is running in {out}; wait for it to finish or stop it") from None
        yield


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    jobs = jobs_for(args, plan.preset)
    existing = check_output_dir(plan)
    with exclusive(plan.out), StopFlag() as stop:
        comparison = prepare_output_dir(plan, existing, command_line(args), jobs)
        report.write_results(plan.out)
        counts = run_cells(plan, comparison, jobs, stop)
        if stop.signum is None and (args.bench or args.extrapolate):
            extras = run_extras(plan, args.bench, args.extrapolate)
            report.write_atomic(plan.out / "extras.json", json.dumps(extras, indent=2) + "\n")
        report.write_results(plan.out)
        md_path, html_path = report.build_report(plan.out)
    print(f"results: {plan.out / 'results.csv'}; report: {md_path} and {html_path}", flush=True)
    if stop.signum is not None:
        print(f"tcompare compare: interrupted; run the same command again to resume {plan.out}", file=sys.stderr)
        return 143 if stop.signum == signal.SIGTERM else 130
    if counts["failed"] or counts["interrupted"]:
        bad = counts["failed"] + counts["interrupted"]
        print(f"tcompare compare: {bad} of {len(plan.cells)} runs did not complete (see the report); "
              "run the same command again to retry them", file=sys.stderr)
        return 1
    return 0
