"""The run directory `tcompare train` writes (docs/architecture.md, docs/guarantees.md).

    run = RunDir.claim(path, resume=False, overwrite=False)   # lock it; refuse what must not be replaced
    run.append_metric(record); run.write_summary(summary)
    run.release()

One process owns a run directory at a time (run_lock: an flock on RUN/.lock). Claiming it also
removes temporary files that a killed writer left (`.NAME.*.tmp`: nobody else can be writing them).

`--overwrite` replaces only a directory that is a run (or one holding nothing of value): the old
run's files are moved into RUN/.replaced/ and deleted once the new run has written its first
checkpoint or summary; if the new run fails before its first step, they are moved back.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from transformer_comparison.artifacts import run as artifacts
from transformer_comparison.artifacts.run import EvalRecord, MetricRecord, RunSummary
from transformer_comparison.errors import UserError
from transformer_comparison.position.rope import ROPE_SCALINGS
from transformer_comparison.run_lock import LOCK_FILE, DirectoryLock

# Everything `tcompare train` (and `tcompare eval` beside it) writes in a run directory.
RUN_FILES = (artifacts.CONFIG_FILE, artifacts.TOKENIZER_FILE, artifacts.METRICS_FILE, artifacts.SUMMARY_FILE,
             artifacts.IDENTITY_FILE, "checkpoints", "wandb", "extrapolation.csv", "extrapolation.png")
# tcompare eval's outputs under --rope_scaling (`evaluation_csv`), one pair per scaling and factor:
# extrapolation-yarn16.csv, extrapolation-linear2.5.png; a user's extrapolation-notes.csv is not the run's.
SCALED_EVALUATION = re.compile(rf"extrapolation-({'|'.join(s for s in ROPE_SCALINGS if s != 'none')})[0-9][0-9.e+]*\.(csv|png)")
# Files a run directory may hold that are not the run's own: kept by --overwrite, ignored when deciding
# whether the directory is empty (tcompare compare opens train.log before it starts the trainer).
COMPANION_FILES = frozenset({"train.log", "cell.json", LOCK_FILE})
REPLACED_DIR = ".replaced"


def evaluation_csv(run_dir: Path, scaling: str) -> Path:
    """Where `tcompare eval` writes by default: RUN/extrapolation.csv, or RUN/extrapolation-KINDFACTOR.csv
    under a RoPE scaling ("yarn:16" -> extrapolation-yarn16.csv), so an evaluation never replaces another's."""
    return run_dir / ("extrapolation.csv" if scaling == "none" else f"extrapolation-{scaling.replace(':', '')}.csv")


def run_files(folder: Path) -> list[str]:
    """The names of everything the run in `folder` may have written: RUN_FILES (present or not) and the
    scaled evaluations present."""
    scaled = sorted(path.name for path in folder.glob("extrapolation-*") if SCALED_EVALUATION.fullmatch(path.name))
    return [*RUN_FILES, *scaled]


def check_run_path(path: Path, option: str = "--out") -> None:
    """A UserError unless `path` is a directory or does not exist yet."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a directory; give a run directory path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a directory")
            break


def is_temporary(path: Path) -> bool:
    """A temporary file of artifacts.io's atomic writers (or of the older `.NAME.tmp` form)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def contents(directory: Path) -> list[str]:
    """The names in `directory` that are not companions or temporaries (what an --overwrite would replace)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.name not in COMPANION_FILES and p.name != REPLACED_DIR and not is_temporary(p))


def is_run_directory(directory: Path) -> bool:
    """Whether `directory` holds a tcompare run: its run.json, or a config.yaml beside anything else a run writes."""
    names = set(contents(directory))
    if artifacts.IDENTITY_FILE in names:
        return True
    return artifacts.CONFIG_FILE in names and bool(names & set(RUN_FILES) - {artifacts.CONFIG_FILE})


class RunDir:
    """A claimed (locked) run directory and the writes to it."""

    def __init__(self, path: Path, lock: DirectoryLock, created: bool) -> None:
        self.path = path
        self.lock = lock
        self.created = created  # this process created the directory
        self.replaced = path / REPLACED_DIR
        self.checkpoint = path / artifacts.CHECKPOINT_FILE
        self.config = path / artifacts.CONFIG_FILE
        self.tokenizer = path / artifacts.TOKENIZER_FILE

    # ---- claiming ------------------------------------------------------------------------------

    @classmethod
    def claim(cls, path: Path, resume: bool, overwrite: bool = False) -> RunDir:
        """Lock `path` for this process. A new run refuses a directory holding anything of value
        unless `overwrite`; then the old run is set aside (see the module docstring)."""
        check_run_path(path, "--resume" if resume else "--out")
        if resume and not path.is_dir():
            raise UserError(f"cannot resume {path}: no such directory")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the run directory {path}: {error.strerror or error}") from None
        lock = DirectoryLock(path, "run directory")
        try:
            lock.acquire()
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        run = cls(path, lock, created)
        try:
            run.remove_temporaries()
            if not resume:
                run._prepare_new(overwrite)
        except BaseException:
            run.release()
            raise
        return run

    def _prepare_new(self, overwrite: bool) -> None:
        names = contents(self.path)
        if not names:
            return
        if not overwrite:
            raise UserError(f"run directory {self.path} already exists; use --resume {self.path}, --overwrite, or another --out")
        if not is_run_directory(self.path):
            raise UserError(f"--overwrite replaces only run directories, and {self.path} is not one (it holds "
                            f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); choose another --out")
        if self.replaced.exists():  # an earlier --overwrite whose run never reached a checkpoint: that run goes
            self._remove_run_files(self.path)
        else:
            self.replaced.mkdir()
            for name in run_files(self.path):
                if (self.path / name).exists():
                    (self.path / name).rename(self.replaced / name)
        foreign = contents(self.path)
        kept = f"; kept files that are not the run's: {', '.join(foreign)}" if foreign else ""
        print(f"--overwrite: the previous run in {self.path} is kept in {self.replaced} until the new run's first "
              f"checkpoint, then deleted{kept}", file=sys.stderr)

    def remove_temporaries(self) -> None:
        """Delete temporary files left by a writer that was killed (we hold the lock: none is being written)."""
        for folder in (self.path, self.path / "checkpoints"):
            if folder.is_dir():
                for item in folder.iterdir():
                    if is_temporary(item):
                        item.unlink(missing_ok=True)

    def release(self) -> None:
        self.lock.release()

    # ---- after --overwrite ------------------------------------------------------------------------

    def drop_replaced(self) -> None:
        """The new run has a result of its own: the set-aside old run goes."""
        if self.replaced.exists():
            shutil.rmtree(self.replaced)

    def roll_back(self) -> None:
        """Undo a new run that failed before its first step: remove what it wrote and restore what
        --overwrite set aside (or the directory itself, if this process created it)."""
        self._remove_run_files(self.path)
        if self.replaced.exists():
            for item in self.replaced.iterdir():
                item.rename(self.path / item.name)
            self.replaced.rmdir()
            print(f"the previous run in {self.path} was restored", file=sys.stderr)
        self.release()
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()

    @staticmethod
    def _remove_run_files(folder: Path) -> None:
        for name in run_files(folder):
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    # ---- metrics and summary ---------------------------------------------------------------------

    def append_metric(self, record: MetricRecord) -> None:
        artifacts.append_metric(self.path, record)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be produced again) and a
        torn last line (a crash mid-write: necessarily after the checkpoint), saying so."""
        records, torn = artifacts.read_metrics_with_tail(self.path)
        if torn:
            print(f"{self.path / artifacts.METRICS_FILE}: dropped an incomplete last line (the process was "
                  "killed while writing it)", file=sys.stderr)
        kept = [record for record in records if record.step <= step]
        if torn or len(kept) != len(records):
            artifacts.write_metrics(self.path, kept)

    def last_eval(self) -> EvalRecord | None:
        evals = artifacts.eval_records(artifacts.read_metrics(self.path))
        return evals[-1] if evals else None

    def previous_summary(self) -> RunSummary | None:
        """The summary.json already there, if it is a valid one."""
        if not (self.path / artifacts.SUMMARY_FILE).exists():
            return None
        try:
            return artifacts.read_summary(self.path)
        except UserError:
            return None

    def write_summary(self, summary: RunSummary) -> bool:
        """Write summary.json, unless that would replace a completed summary with a run that did not
        complete (a resumed continuation that diverged or was interrupted). Returns whether it wrote."""
        previous = self.previous_summary()
        if previous is not None and previous.status == "completed" and summary.status != "completed":
            print(f"kept the completed {self.path / artifacts.SUMMARY_FILE} (step {previous.steps}); this continuation "
                  f"ended {summary.status} at step {summary.steps}", file=sys.stderr)
            return False
        artifacts.write_summary(self.path, summary)
        return True
