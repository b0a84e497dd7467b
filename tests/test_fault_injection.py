"""Kill a training run again and again, inside checkpoint writes, mid metrics line and at random
moments, resume it each time, and get exactly the uninterrupted run's result with nothing left over."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import run_cli, tiny_config
from transformer_comparison.checkpoint import load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MAX_STEPS = 48


def faulted(fault: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fault_runner", fault, *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=Path(__file__).resolve().parents[1])


def checkpoint_step(path: Path) -> int:
    try:
        return load_checkpoint(path)["step"]
    except Exception:  # noqa: BLE001  (none yet)
        return -1


def killed_at_random(rng: random.Random, run_dir: Path, *args: str) -> int:
    """Start `tcompare ARGS`, wait until it has written a checkpoint of its own, then SIGKILL it a
    random moment later (in a step, an evaluation, a metrics line or the next checkpoint write)."""
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    start = checkpoint_step(checkpoint)
    process = subprocess.Popen([sys.executable, "-m", "transformer_comparison", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and checkpoint_step(checkpoint) <= start:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))
    process.send_signal(signal.SIGKILL)
    return process.wait()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    """(kind, step) -> loss, for every train and eval record."""
    out = {}
    for r in records(run_dir):
        kind = "train_loss" if "train_loss" in r else "val_loss"
        assert (kind, r["step"]) not in out, f"duplicate {kind} record at step {r['step']}"
        out[kind, r["step"]] = r[kind]
    return out


def test_repeated_kills_end_in_the_uninterrupted_result(tmp_path):
    config = tiny_config(tmp_path, training={"max_steps": MAX_STEPS, "checkpoint_interval": 3, "eval_interval": 6},
                         logging={"log_interval": 1})
    reference = tmp_path / "reference"
    assert run_cli("train", "--config", str(config), "--out", str(reference)).returncode == 0

    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    resume = ("train", "--resume", str(run_dir))
    # a new run killed half-way through writing its second checkpoint
    assert faulted("checkpoint:2", "train", "--config", str(config), "--out", str(run_dir)).returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == 3  # the first one is intact
    killed = [faulted("metrics:7", *resume).returncode,  # a torn last line in metrics.jsonl
              killed_at_random(rng, run_dir, *resume),
              faulted("checkpoint:1", *resume).returncode,  # torn again, on a resumed run's first checkpoint
              killed_at_random(rng, run_dir, *resume),
              faulted("metrics:3", *resume).returncode]
    assert killed == [-signal.SIGKILL] * 5, killed
    final = run_cli(*resume)
    assert final.returncode == 0, final.stderr

    ref_state = load_checkpoint(reference / "checkpoints" / "latest.pt")
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert state["step"] == MAX_STEPS
    for name, tensor in ref_state["model"].items():
        assert torch.equal(tensor, state["model"][name]), name
    assert losses(run_dir) == losses(reference)  # every record once, bit for bit
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["status"] == "completed" and summary["final_val_loss"] == ref_summary["final_val_loss"]
    leftovers = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
                 if p.name.endswith(".tmp") or p.name in (".lock", ".replaced")]
    assert not leftovers, leftovers
