"""One cell of the grid, trained where an executor puts it: a `tcompare train` process and its cell.json.

    job = CellJob(...)                       # everything a worker needs, picklable (Ray sends it)
    record = execute(job, env)               # decide fresh/resume, train, write runs/<name>/cell.json

`execute` decides at the moment it runs whether the run is resumed or trained afresh, so a cell that
is retried after its worker died (Ray's max_retries) continues from the run's last checkpoint. The
trainer is a child process whose output goes to the run's train.log; it dies with the process that
started it (`run_lock.die_with_parent`, Linux): SIGTERM under the local executor (the trainer
checkpoints and stops when the comparison is killed), SIGKILL under Ray (a retry of the cell must
not meet the dead worker's trainer, which would still hold the run directory's lock).
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

from transformer_comparison.artifacts.comparison import COMPARISON_FILE, CellRecord, Scalar, read_cell_record, write_cell_record
from transformer_comparison.artifacts.run import CHECKPOINT_FILE, RunSummary, read_summary
from transformer_comparison.errors import UserError
from transformer_comparison.run_lock import die_with_parent

Action = Literal["skip", "resume", "fresh"]
INTERRUPTED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)
WAIT_SLICE_SECONDS = 0.5
STOP_FILE = "stop-requested"  # in a run directory: the driver asks the cell's task to stop its trainer


@dataclass
class CellJob:
    """What a worker needs to train one run, with absolute paths (the same on every node)."""

    name: str
    attention_type: str
    position_embedding: str
    seed: int
    out: str  # the comparison directory
    fresh_args: list[str]  # `tcompare train ...` arguments for a new run
    resume_args: list[str]  # ... and to continue one from its checkpoint
    sweep: dict[str, Scalar] = field(default_factory=dict)
    executor: str = "local"
    death_signal: int = signal.SIGTERM  # what the trainer gets when the process that started it dies

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / "runs" / self.name


def read_summary_or_none(run_dir: Path) -> RunSummary | None:
    """summary.json when it exists and is valid (a run killed mid-write has none)."""
    try:
        return read_summary(run_dir)
    except UserError:
        return None


def read_record_or_none(run_dir: Path) -> CellRecord | None:
    try:
        return read_cell_record(run_dir)
    except UserError:
        return None


def cell_action(run_dir: Path) -> Action:
    """What a run needs: skip (completed), resume (it has a checkpoint) or fresh (new or failed).

    A diverged run starts again from scratch (resuming would diverge again, exactly), and so does a
    run whose last attempt was a resume that failed (e.g. an unreadable checkpoint).
    """
    summary = read_summary_or_none(run_dir)
    if summary is not None and summary.status == "completed":
        return "skip"
    record = read_record_or_none(run_dir)
    failed_resume = record is not None and record.status == "failed" and record.action == "resume"
    diverged = summary is not None and summary.status == "diverged"
    if (run_dir / CHECKPOINT_FILE).is_file() and not (diverged or failed_resume):
        return "resume"
    return "fresh"


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


def prepare_child(death_signal: int) -> None:
    """In the trainer before exec: SIGINT and SIGTERM unblocked (a Ray worker runs its tasks with
    SIGINT blocked, and a child inherits the mask: the trainer could not be stopped), and
    `death_signal` when the parent dies."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    die_with_parent(death_signal)


def request_stop(run_dir: Path) -> None:
    """Ask the task training `run_dir` to stop its trainer (Ctrl-C of a Ray comparison): a file in the
    run directory, which the task looks for while it waits. Ray's cancel alone was seen not to reach
    a running task (the trainer went on for minutes), while the shared directory always does."""
    try:
        (run_dir / STOP_FILE).touch()
    except OSError:
        pass  # the directory is not there yet: the task has not started and Ray's cancel drops it


def clear_stop(run_dir: Path) -> None:
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def wait_interruptibly(process: subprocess.Popen, stop_file: Path | None = None) -> int:
    """The child's exit code, waiting in short slices: Ray cancels a task by raising KeyboardInterrupt
    in its thread, which only happens between Python bytecodes, never inside one long wait(); and
    once `stop_file` appears the child gets SIGINT (it checkpoints and stops)."""
    signalled = False
    while True:
        try:
            return process.wait(timeout=WAIT_SLICE_SECONDS)
        except subprocess.TimeoutExpired:
            if stop_file is not None and not signalled and stop_file.exists():
                process.send_signal(signal.SIGINT)
                signalled = True


def check_shared_directory(job: CellJob) -> None:
    """Runs are written straight into the comparison directory: on a cluster it must be on a
    filesystem every node mounts at the same path."""
    if not (Path(job.out) / COMPARISON_FILE).is_file():
        raise UserError(f"{job.out} is not visible on {socket.gethostname()}: the comparison directory must be on a "
                        "filesystem shared by every Ray node, at the same path (see docs/report.md)")


def outcome(job: CellJob, returncode: int, log: Path, offset: int) -> tuple[str, str | None]:
    """completed | failed | interrupted, and the error, from the exit code and summary.json."""
    summary = read_summary_or_none(job.run_dir)
    if returncode in INTERRUPTED_CODES:
        return "interrupted", f"interrupted (exit {returncode}); run the same command again to resume"
    if returncode != 0:
        return "failed", f"exit {returncode}: {last_line(log, offset) or 'no output'}"
    if summary is None:
        return "failed", "train exited 0 but wrote no summary.json"
    if summary.status != "completed":
        return "failed", f"summary.json says {summary.status}: {summary.error}"
    return "completed", None


def execute(job: CellJob, env: dict[str, str], on_start: Callable[[subprocess.Popen], None] | None = None) -> CellRecord:
    """Train the run (fresh or resumed, whichever it needs now) and record it in its cell.json."""
    check_shared_directory(job)
    run_dir = job.run_dir
    action = cell_action(run_dir)
    previous = read_record_or_none(run_dir)
    if action == "skip":  # finished by an earlier attempt that died before recording it
        if previous is not None and previous.status == "completed":
            return previous
        record = _record(job, "completed", None, 0, "resume", 0.0, previous, "")
        write_cell_record(run_dir, record)
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    stop_file = run_dir / STOP_FILE
    if stop_file.exists():  # the comparison was stopped before this task began: start nothing
        clear_stop(run_dir)
        record = _record(job, "interrupted", "stopped before it started; run the same command again to resume",
                         130, action, 0.0, previous, "")
        write_cell_record(run_dir, record)
        return record
    args = job.resume_args if action == "resume" else job.fresh_args
    command = [sys.executable, "-m", "transformer_comparison", *args]
    log_path = run_dir / "train.log"
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"# tcompare compare, {datetime.now().isoformat(timespec='seconds')}, {action} on "
                  f"{socket.gethostname()}: {shlex.join(command)}\n")
        log.flush()
        offset = log.tell()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=functools.partial(prepare_child, job.death_signal))
        if on_start is not None:
            on_start(process)
        try:
            returncode = wait_interruptibly(process, stop_file)
        except KeyboardInterrupt:  # Ray's cancel (or Ctrl-C in this process): the trainer checkpoints and stops
            process.send_signal(signal.SIGINT)
            returncode = process.wait()
    clear_stop(run_dir)
    status, error = outcome(job, returncode, log_path, offset)
    record = _record(job, status, error, returncode, action, time.perf_counter() - started, previous, shlex.join(command))
    write_cell_record(run_dir, record)
    return record


def _record(job: CellJob, status: str, error: str | None, returncode: int, action: str, wall: float,
            previous: CellRecord | None, command: str) -> CellRecord:
    return CellRecord(
        name=job.name, attention_type=job.attention_type, position_embedding=job.position_embedding, seed=job.seed,
        sweep=job.sweep, status=status, error=error, returncode=returncode,
        action="resume" if action == "resume" else "fresh", wall_seconds=round(wall, 3),
        total_wall_seconds=round(wall + (previous.total_wall_seconds if previous else 0.0), 3),
        attempts=(previous.attempts if previous else 0) + (1 if command else 0), command=command or None,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), executor=job.executor, node=socket.gethostname(),
    )


def child_environment(threads: int | None, device: str | None) -> dict[str, str]:
    """Unbuffered output; `threads` CPU threads (None: leave the environment's choice); one GPU when given."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env
