"""Where the cells of a grid train: this machine (`--executor local`) or a Ray cluster (`--executor ray`).

    with StopFlag() as stop:
        executor.run(jobs, done, stop)       # done(job, record) as each cell finishes, in the driver

Both run the same `cells.execute` per cell, so a cell trains the same way (the same `tcompare train`
command, the same CPU threads) and gives bit-for-bit the same run on CPU whichever executor ran it.

local: a `concurrent.futures` thread pool of --jobs threads, each waiting on one trainer process,
with a queue of CUDA devices when there are several. Ctrl-C (SIGINT/SIGTERM) reaches the running
trainers, which checkpoint and stop; queued cells never start.

ray: one Ray task per cell with declared resources (--cpus_per_cell, --gpus_per_cell), on a local
Ray instance or the cluster at --ray_address. A worker that dies mid-cell is retried (max_retries)
and the retry resumes the run from its last checkpoint; Ctrl-C cancels the tasks and leaves a stop
request in each running cell's directory (`cells.request_stop`, in case the cancel is lost), whose trainers
checkpoint and stop. Run directories are written straight into the comparison directory, which on
a cluster must be a filesystem every node mounts at the same path (the task checks it).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

from transformer_comparison.artifacts.comparison import CellRecord, write_cell_record
from transformer_comparison.compare.cells import CellJob, child_environment, clear_stop, execute, read_record_or_none, request_stop
from transformer_comparison.errors import UserError

Done = Callable[[CellJob, CellRecord], None]
WAIT_SECONDS = 0.5  # how often the driver looks at the stop flag while cells train
RAY_MAX_RETRIES = 3  # a cell whose worker dies is started again (from its checkpoint) up to this often


class StopFlag:
    """SIGINT/SIGTERM in the driver: start no more cells and tell the running ones to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.listeners: list[Callable[[int], None]] = []
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def request(self, signum: int, _frame: Any = None) -> None:
        self.signum = signum
        for listener in list(self.listeners):
            listener(signum)


def failed_record(job: CellJob, error: str) -> CellRecord:
    """A cell whose task itself failed (not its trainer): recorded in its run directory."""
    previous = read_record_or_none(job.run_dir)
    record = CellRecord(name=job.name, attention_type=job.attention_type, position_embedding=job.position_embedding,
                        seed=job.seed, sweep=job.sweep, status="failed", error=error, executor=job.executor,
                        attempts=(previous.attempts if previous else 0) + 1,
                        total_wall_seconds=previous.total_wall_seconds if previous else 0.0)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    write_cell_record(job.run_dir, record)
    return record


def clear_stale_stops(jobs: list[CellJob]) -> None:
    """Remove stop requests (`cells.request_stop`) left by an earlier, interrupted run of the grid."""
    for job in jobs:
        if job.run_dir.is_dir():
            clear_stop(job.run_dir)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}" if not isinstance(error, UserError) else lines[0]


# ----------------------------------------------------------------------------------------------


@dataclass
class LocalExecutor:
    jobs: int = 1  # cells trained at once
    threads: int | None = None  # CPU threads per trainer (None: the environment's default)
    devices: tuple[str | None, ...] = (None,)  # CUDA_VISIBLE_DEVICES per concurrent cell

    name = "local"

    def describe(self) -> str:
        return f"local executor, {self.jobs} at a time"

    def run(self, jobs: list[CellJob], done: Done, stop: StopFlag) -> None:
        clear_stale_stops(jobs)
        free: queue.Queue[str | None] = queue.Queue()
        for device in (self.devices * self.jobs)[: self.jobs]:
            free.put(device)
        running: set[subprocess.Popen] = set()
        lock = threading.Lock()

        def forward(signum: int) -> None:
            with lock:
                for process in running:
                    if process.poll() is None:
                        process.send_signal(signum)

        def started(process: subprocess.Popen) -> None:
            with lock:
                running.add(process)
            if stop.signum is not None:  # the stop came while it was starting
                process.send_signal(stop.signum)

        def work(job: CellJob) -> CellRecord | None:
            if stop.signum is not None:
                return None
            device = free.get()
            try:
                return execute(job, child_environment(self.threads, device), started)
            finally:
                free.put(device)

        stop.listeners.append(forward)
        try:
            with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="cell") as pool:
                futures: dict[Future, CellJob] = {pool.submit(work, job): job for job in jobs}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, timeout=WAIT_SECONDS, return_when=FIRST_COMPLETED)
                    for future in finished:
                        job = futures[future]
                        if future.cancelled():
                            continue
                        error = future.exception()
                        record = failed_record(job, _one_line(error)) if error else future.result()
                        if record is not None:
                            done(job, record)
                    if stop.signum is not None:
                        for future in pending:
                            future.cancel()
        finally:
            stop.listeners.remove(forward)


# ----------------------------------------------------------------------------------------------


def _ray_cell(job: CellJob, threads: int) -> CellRecord:
    """The Ray task: one cell on whichever node Ray chose (Ray sets CUDA_VISIBLE_DEVICES for GPU tasks)."""
    return execute(job, child_environment(threads, None))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'transformer-comparison[ray]' "
                        "(or use --executor local)") from None
    return ray


@dataclass
class RayExecutor:
    address: str | None = None  # None: a local Ray instance (or the one this process already started)
    cpus_per_cell: int = 1
    gpus_per_cell: float = 0.0
    max_in_flight: int | None = None  # None: as many as the cluster's resources allow
    max_retries: int = RAY_MAX_RETRIES

    name = "ray"

    def describe(self) -> str:
        limit = f", at most {self.max_in_flight} at a time" if self.max_in_flight else ""
        return f"ray executor ({self.address or 'local instance'}), {self.cpus_per_cell} CPU(s) and {self.gpus_per_cell:g} GPU(s) per run{limit}"

    def connect(self) -> bool:
        """Start or join Ray; True when this call started it (and must shut it down)."""
        ray = import_ray()
        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UserError(f"cannot start or reach Ray (--ray_address {self.address or 'local'}): {_one_line(error)}") from None
        return True

    def run(self, jobs: list[CellJob], done: Done, stop: StopFlag) -> None:
        ray = import_ray()
        started_here = self.connect()
        task = ray.remote(_ray_cell)
        resources = {"num_cpus": self.cpus_per_cell, "num_gpus": self.gpus_per_cell, "max_retries": self.max_retries,
                     "retry_exceptions": False}
        waiting, refs, cancelled = list(jobs), {}, False
        clear_stale_stops(jobs)
        try:
            while waiting or refs:
                limit = self.max_in_flight or len(jobs)
                while waiting and len(refs) < limit and stop.signum is None:
                    job = waiting.pop(0)
                    refs[task.options(name=job.name, **resources).remote(job, self.cpus_per_cell)] = job
                if stop.signum is not None and not cancelled:
                    waiting.clear()
                    for ref, job in refs.items():
                        request_stop(job.run_dir)  # the task sees it within half a second, even if the cancel is lost
                        ray.cancel(ref)  # a KeyboardInterrupt in the task: its trainer checkpoints and stops
                    cancelled = True
                if not refs:
                    break
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_SECONDS)
                for ref in ready:
                    job = refs.pop(ref)
                    record = self._result(ray, ref, job)
                    if record is not None:
                        done(job, record)
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _result(ray: Any, ref: Any, job: CellJob) -> CellRecord | None:
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return read_record_or_none(job.run_dir)  # written by the task when its trainer stopped; None: never started
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else error
            return failed_record(job, _one_line(cause))
        except ray.exceptions.RayError as error:  # the worker died more often than max_retries
            return failed_record(job, f"Ray: {_one_line(error)}")


def default_threads(jobs: int) -> int | None:
    """Local executor: with several cells at once, a share of the CPUs each (unless OMP_NUM_THREADS is set)."""
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        return max(1, (os.cpu_count() or 1) // jobs)
    return None


def cuda_devices(jobs: int) -> tuple[str | None, ...]:
    """One CUDA device per concurrent cell when several are visible; otherwise no pinning."""
    if jobs < 2:
        return (None,)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return (None,)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible[:count] if visible else [str(i) for i in range(count)]
    return tuple(ids)
