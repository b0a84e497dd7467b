"""The run directory cannot be corrupted: one writer, refused resumes change nothing, verified
checkpoints, no worse summary over a good one, torn metrics recovered, --overwrite limited and safe."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_config, write_corpus
from transformer_comparison.artifacts.run import RunSummary, read_summary
from transformer_comparison.checkpoint import load_checkpoint
from transformer_comparison.cli import main
from transformer_comparison.run_dir import RunDir

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def cli(capsys):
    """`tcompare ARGS` in this process (faster than a subprocess), as a CompletedProcess."""

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(config, a completed 4-step run directory): copy it before changing it."""
    folder = tmp_path_factory.mktemp("finished")
    config = tiny_config(folder, training={"max_steps": 4, "checkpoint_interval": 2, "eval_interval": 2})
    assert main(["train", "--config", str(config), "--out", str(folder / "run")]) == 0
    return config, folder / "run"


def copy_run(finished: tuple[Path, Path], target: Path) -> Path:
    shutil.copytree(finished[1], target)
    return target


def start_training(config: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    """A long training process, returned once it holds the run directory and has logged a step."""
    process = subprocess.Popen([sys.executable, "-m", "transformer_comparison", "train", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    return process


# --- one writer at a time ---------------------------------------------------------------------


def test_a_second_trainer_into_the_same_directory_is_refused(tmp_path, cli):
    config = tiny_config(tmp_path, training={"max_steps": 100000, "checkpoint_interval": 5, "eval_interval": 100000})
    run_dir = tmp_path / "run"
    first = start_training(config, run_dir, "--config", str(config), "--out", str(run_dir))
    try:
        second = cli("train", "--config", str(config), "--attention_type", "local", "--out", str(run_dir), "--overwrite")
        one_line_error(second, str(run_dir), f"pid {first.pid}")
        resume = cli("train", "--resume", str(run_dir))
        one_line_error(resume, f"pid {first.pid}")
        assert "dot_product" in (run_dir / "config.yaml").read_text() and "type: local" not in (run_dir / "config.yaml").read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no interleaved or duplicated records


# --- a refused resume changes nothing ---------------------------------------------------------


@pytest.mark.parametrize("override, named", [
    ("model.d_model=64", "model.d_model"),
    ("training.learning_rate=0.5", "training.learning_rate"),
    ("training.max_steps=3", "training.max_steps=3 is below the step of the run's checkpoint (4)"),
])
def test_a_refused_resume_changes_no_file(finished, tmp_path, override, named, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    before = snapshot(run_dir)
    one_line_error(cli("train", "--resume", str(run_dir), override), named)
    assert snapshot(run_dir) == before


def test_a_changed_corpus_refuses_the_resume_and_changes_nothing(tmp_path, cli):
    config = tiny_config(tmp_path, training={"max_steps": 4, "checkpoint_interval": 2})
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 0
    corpus = write_corpus(tmp_path)
    corpus.write_text(corpus.read_text().replace("fox", "cat"))
    before = snapshot(run_dir)
    one_line_error(cli("train", "--resume", str(run_dir), "training.max_steps=6"), "the data changed", "sha256")
    assert snapshot(run_dir) == before


def test_keys_that_may_change_on_resume_are_accepted(finished, tmp_path, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    result = cli("train", "--resume", str(run_dir), "training.max_steps=6", "logging.log_interval=3",
                     "training.eval_interval=3")
    assert result.returncode == 0, result.stderr
    assert read_summary(run_dir).steps == 6 and "max_steps: 6" in (run_dir / "config.yaml").read_text()


def test_resuming_a_finished_run_changes_nothing(finished, tmp_path, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    before = snapshot(run_dir)
    result = cli("train", "--resume", str(run_dir))
    assert result.returncode == 0 and "already complete" in result.stderr
    assert snapshot(run_dir) == before


# --- verified checkpoints -----------------------------------------------------------------------


def flip(path: Path, offsets: list[int]) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["weights", "random"])
def test_a_damaged_checkpoint_is_refused_in_one_line(finished, tmp_path, damage, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    if damage == "weights":  # bytes inside a tensor: the file still loads, only the checksum can tell
        state = load_checkpoint(checkpoint)
        raw = state["model"]["token_embedding.weight"].numpy().tobytes()
        offset = checkpoint.read_bytes().index(raw[:64])
        flip(checkpoint, [offset + 100, offset + 101])
    else:
        flip(checkpoint, [int(i * 9973.7) for i in range(1, 40)])
    before = snapshot(run_dir)
    one_line_error(cli("train", "--resume", str(run_dir), "training.max_steps=6"), str(checkpoint))
    one_line_error(cli("generate", "--run", str(run_dir), "--max_new_tokens", "5"), str(checkpoint))
    assert snapshot(run_dir) == before


def test_another_runs_checkpoint_is_refused(finished, tmp_path, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    other = tmp_path / "other"
    assert main(["train", "--config", str(finished[0]), "--out", str(other)]) == 0  # same config and shapes
    shutil.copy(other / "checkpoints" / "latest.pt", run_dir / "checkpoints" / "latest.pt")
    before = snapshot(run_dir)
    one_line_error(cli("train", "--resume", str(run_dir), "training.max_steps=6"), "belongs to another run")
    assert snapshot(run_dir) == before


def test_a_completed_summary_is_not_replaced_by_a_continuation_that_did_not_complete(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    good = read_summary(run_dir)
    run = RunDir.claim(run_dir, resume=True)
    try:
        worse = RunSummary.model_validate({**good.model_dump(), "status": "diverged", "final_val_loss": None, "steps": 5})
        assert not run.write_summary(worse)
        assert "kept the completed" in capsys.readouterr().err
        assert read_summary(run_dir) == good
    finally:
        run.release()


# --- a torn metrics line --------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_said(finished, tmp_path, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "elapsed_seconds": 1.0, "train_lo')
    result = cli("train", "--resume", str(run_dir), "training.max_steps=6")
    assert result.returncode == 0, result.stderr
    assert "dropped an incomplete last line" in result.stderr and str(run_dir / "metrics.jsonl") in result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6


# --- --overwrite ----------------------------------------------------------------------------------


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, cli):
    config = tiny_config(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    one_line_error(cli("train", "--config", str(config), "--out", str(mine), "--overwrite"), "not one")
    assert (mine / "config.yaml").read_text() == "my own notes\n" and sorted(os.listdir(mine)) == ["config.yaml"]


def test_overwrite_removes_every_file_of_the_old_run(finished, tmp_path, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "extrapolation.csv").write_text("eval_length\n64\n")
    (run_dir / "extrapolation-yarn4.csv").write_text("eval_length\n64\n")  # eval --rope_scaling yarn's
    (run_dir / "extrapolation-notes.csv").write_text("mine\n")  # a user's file, not the run's
    (run_dir / "train.log").write_text("kept: the comparison's log\n")
    result = cli("train", "--config", str(finished[0]), "--out", str(run_dir), "--overwrite", "training.max_steps=2")
    assert result.returncode == 0, result.stderr
    assert not (run_dir / "extrapolation.csv").exists() and not (run_dir / ".replaced").exists()
    assert not (run_dir / "extrapolation-yarn4.csv").exists() and (run_dir / "extrapolation-notes.csv").read_text() == "mine\n"
    assert read_summary(run_dir).steps == 2 and (run_dir / "train.log").read_text().startswith("kept")


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(finished, tmp_path, cli):
    run_dir = copy_run(finished, tmp_path / "run")
    old_summary = (run_dir / "summary.json").read_bytes()
    killed = subprocess.run([sys.executable, "-m", "tests.fault_runner", "checkpoint:1", "train", "--config", str(finished[0]),
                             "--out", str(run_dir), "--overwrite"], capture_output=True, text=True, env=ENV,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / ".replaced" / "summary.json").read_bytes() == old_summary  # the old run is still there
    assert cli("train", "--resume", str(run_dir)).returncode == 0
    assert not (run_dir / ".replaced").exists() and read_summary(run_dir).status == "completed"


def test_a_new_run_that_fails_before_its_first_step_restores_the_old_one(finished, tmp_path, monkeypatch):
    run_dir = copy_run(finished, tmp_path / "run")
    before = snapshot(run_dir)

    def fail(*args, **kwargs):
        raise RuntimeError("the machine broke")

    monkeypatch.setattr("transformer_comparison.train.train_loop", fail)
    with pytest.raises(RuntimeError):
        main(["train", "--config", str(finished[0]), "--out", str(run_dir), "--overwrite", "training.max_steps=2"])
    assert snapshot(run_dir) == before
    with pytest.raises(RuntimeError):
        main(["train", "--config", str(finished[0]), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()  # a new directory is removed again


# --- paths ----------------------------------------------------------------------------------------


def test_out_that_is_a_file_is_refused(tmp_path, cli):
    config = tiny_config(tmp_path)
    (tmp_path / "file").write_text("x")
    one_line_error(cli("train", "--config", str(config), "--out", str(tmp_path / "file")), "is a file")
    one_line_error(cli("train", "--config", str(config), "--out", str(tmp_path / "file" / "run")), "is a file")
    assert (tmp_path / "file").read_text() == "x"
