"""`tcompare train` end to end: outputs, metrics, resume exactness, interruption, divergence, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli, tiny_config
from transformer_comparison.attention import ATTENTION_TYPES, kernel_class
from transformer_comparison.checkpoint import load_checkpoint
from transformer_comparison.cli import main
from transformer_comparison.position import POSITION_TYPES

SUMMARY_KEYS = {
    "final_val_loss", "final_val_perplexity", "tokens_per_second", "peak_memory_bytes",
    "train_time_seconds", "attention_entropy", "num_parameters", "world_size",
}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("position", POSITION_TYPES)
def test_every_combination_trains_and_writes_its_run_directory(tmp_path, attention_type, position):
    config = tiny_config(tmp_path, training={"max_steps": 4, "eval_interval": 4, "checkpoint_interval": 4})
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--attention_type", attention_type, "--position_embedding", position, "--out", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert math.isclose(summary["final_val_perplexity"], math.exp(summary["final_val_loss"]), rel_tol=1e-9)
    assert summary["peak_memory_bytes"] > 0 and summary["num_parameters"] > 0
    entropy = summary["attention_entropy"]
    if not kernel_class(attention_type).has_entropy:  # no attention distribution: null, not a crash
        assert entropy is None and summary["mean_attention_entropy"] is None
    else:
        assert len(entropy) == 1 and len(entropy[0]) == 4
        assert all(0 <= h <= math.log(16) + 1e-4 for h in entropy[0])  # at most log(#keys) nats
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints/latest.pt"):
        assert (run_dir / name).is_file()


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 40, "eval_interval": 20, "learning_rate": 3e-3})
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 0
    records = read_metrics(run_dir)
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(2, 41, 2))
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(30)
    assert all(r["tokens_per_second"] >= 0 and r["lr"] > 0 for r in train)


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    config = tiny_config(tmp_path, training={"max_steps": 2})
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 0
    before = (run_dir / "summary.json").read_text()
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == before
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--overwrite"]) == 0


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")["model"]


def test_resume_after_kill_9_reaches_the_uninterrupted_result(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 400, "checkpoint_interval": 20, "eval_interval": 200})
    reference = tmp_path / "reference"
    assert run_cli("train", "--config", str(config), "--out", str(reference)).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "transformer_comparison", "train", "--config", str(config), "--out", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    checkpoint = killed / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.exists() and load_step(checkpoint) >= 40):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = load_step(checkpoint)
    assert 40 <= interrupted_at < 400, "the run was not interrupted mid-way"

    resumed = run_cli("train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    for name, tensor in final_state(reference).items():
        assert torch.equal(tensor, final_state(killed)[name]), name
    ref_summary = json.loads((reference / "summary.json").read_text())
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["final_val_loss"] == ref_summary["final_val_loss"]
    steps = [r["step"] for r in read_metrics(killed) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # records after the checkpoint were replaced, not duplicated


def load_step(path: Path) -> int:
    try:
        return load_checkpoint(path)["step"]
    except Exception:  # a reader racing the writer sees the old file or nothing: never a partial one
        return -1


def test_sigint_checkpoints_and_exits_cleanly(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 100000, "checkpoint_interval": 0, "eval_interval": 100000})
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "transformer_comparison", "train", "--config", str(config), "--out", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "--resume" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == summary["steps"] > 0


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from transformer_comparison.model import GPT

    calls = {"n": 0}
    original_forward = GPT.forward

    def forward_that_diverges_after_step_5(self, idx, targets=None, return_entropy=False):
        logits, loss, entropy = original_forward(self, idx, targets, return_entropy)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 5:
                loss = loss * float("nan")
        return logits, loss, entropy

    monkeypatch.setattr(GPT, "forward", forward_that_diverges_after_step_5)
    config = tiny_config(tmp_path, training={"max_steps": 50, "checkpoint_interval": 2})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and len(err.strip().splitlines()) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention_type", "softmax"], "invalid choice"),
        (["model.d_model=30"], "model.d_model"),
        (["training.learning_rate=-1"], "training.learning_rate"),
        (["model.colour=red"], "model.colour"),
        (["data.dataset=/no/such/file.txt"], "/no/such/file.txt"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    config = tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli("train", "--config", str(config), "--out", str(run_dir), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_resume_of_a_foreign_directory_and_corrupt_checkpoint(tmp_path):
    result = run_cli("train", "--resume", str(tmp_path))
    assert result.returncode == 2 and "config.yaml" in result.stderr and "Traceback" not in result.stderr
    config = tiny_config(tmp_path, training={"max_steps": 4})
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 0
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    result = run_cli("train", "--resume", str(run_dir))
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_wandb_offline_writes_a_syncable_run_without_prompting(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 4}, logging={"wandb": "offline"})
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "transformer_comparison", "train", "--config", str(config), "--out", str(tmp_path / "run")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))


def test_two_process_ddp_on_cpu(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": 6, "batch_size": 4})
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "transformer_comparison", "train", "--config", str(config), "--out", str(run_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"


def test_float16_trains_with_a_loss_scaler_and_resumes_exactly(tmp_path, monkeypatch):
    from transformer_comparison import train as train_module

    config = tiny_config(tmp_path, training={"max_steps": 8, "checkpoint_interval": 2, "dtype": "float16"})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "reference")]) == 0
    reference = load_checkpoint(tmp_path / "reference" / "checkpoints" / "latest.pt")
    assert reference["scaler"]["scale"] > 1  # dynamic loss scaling is on

    original = train_module.train_step

    def interrupted_at_step_5(session, step):
        if step == 5:
            raise KeyboardInterrupt
        return original(session, step)

    monkeypatch.setattr(train_module, "train_step", interrupted_at_step_5)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 130
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 4
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert resumed["scaler"] == reference["scaler"]
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_summary_and_metrics_read_back_into_the_typed_models(tmp_path):
    from transformer_comparison.artifacts.run import eval_records, read_metrics, read_summary, train_records

    config = tiny_config(tmp_path, training={"max_steps": 6, "eval_interval": 3})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    summary = read_summary(tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r.step for r in eval_records(records)] == [3, 6] and [r.step for r in train_records(records)] == [2, 4, 6]
    assert summary.final_val_loss == eval_records(records)[-1].val_loss and summary.run_id
    assert summary.dataset.train_tokens > 0 and summary.status == "completed"
