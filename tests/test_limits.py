"""Limits checked up front, with one-line errors naming the problem, and nothing written before them."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from tests.helpers import SENTENCES, tiny_config
from transformer_comparison.cli import main
from transformer_comparison.config import load_config
from transformer_comparison.errors import UserError
from transformer_comparison.model import build_model
from transformer_comparison.resources import MemoryEstimate, check_fits, machine_memory, training_memory


def error_of(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("overrides", [
    ["model.d_model=16384", "model.num_layers=48"],  # parameters and optimizer state alone
    ["training.batch_size=10000000"],  # activations
    ["attention.type=linear", "attention.linear.chunk_size=1000000"],  # every sequence padded to the chunk
])
def test_a_step_that_cannot_fit_is_refused_with_the_estimate_and_writes_nothing(tmp_path, capsys, overrides):
    config = tiny_config(tmp_path)
    err = error_of(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"), *overrides)
    total, _ = machine_memory(torch.device("cpu"))
    assert "a training step needs about" in err and "more than this machine has" in err and "GiB" in err
    assert f"{total / 2**30:.2f} GiB" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("attention", ["dot_product", "flash", "linear"])
def test_the_training_estimate_is_close_to_a_measured_step(tmp_path, attention):
    """At the traced length the estimate is the saved activations plus weights, grads and Adam state:
    within 25% of MemTracker's peak over a real step of a small model."""
    cfg = load_config(tiny_config(tmp_path), ["model.context_length=64", "model.d_model=64", f"attention.type={attention}"])
    estimate = training_memory(cfg, 40, micro_batch=8)
    torch.manual_seed(0)
    model = build_model(cfg, 40)
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 40, (8, 64))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        model(idx, idx)[1].backward()
        optimizer.step()
    measured = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
    assert estimate.traced and estimate.parameters == 4 * sum(p.numel() for p in model.parameters())
    assert 0.75 * measured < estimate.total < 1.25 * measured, (estimate, measured)


def test_check_fits_names_both_sides():
    total, description = machine_memory(torch.device("cpu"))
    check_fits(MemoryEstimate(total // 4, 0, 0, True), torch.device("cpu"), "x", "advice")
    with pytest.raises(UserError) as error:
        check_fits(MemoryEstimate(total, total, 0, True), torch.device("cpu"), "a training step", "lower it")
    assert description in str(error.value) and str(error.value).endswith("lower it")


def test_wandb_online_without_a_login_is_refused_before_the_run_directory_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = tiny_config(tmp_path, logging={"wandb": "online"})
    assert "logging.wandb=online" in error_of(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A finished tiny run whose validation split is longer than 100000 tokens."""
    folder = tmp_path_factory.mktemp("long")
    corpus = folder / "long.txt"
    corpus.write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(12000)))
    config = tiny_config(folder, training={"max_steps": 2}, data={"dataset": str(corpus), "val_fraction": 0.5})
    assert main(["train", "--config", str(config), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_eval_at_an_absurd_length_is_refused_before_evaluating(long_run, capsys):
    err = error_of(capsys, "eval", "--run", str(long_run), "--lengths", "16,100000")
    assert "evaluating at length 100000" in err and "more than this machine has" in err
    assert not (long_run / "extrapolation.csv").exists()


def test_eval_out_that_is_a_directory_is_refused(long_run, capsys, tmp_path):
    assert "is a directory" in error_of(capsys, "eval", "--run", str(long_run), "--lengths", "16", "--out", str(tmp_path))


@pytest.mark.parametrize("args, named", [
    (["--max_new_tokens", str(10**12)], "--max_new_tokens must be between 0 and 1,000,000"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--seed", "-1"], "--seed"),
])
def test_generate_refuses_absurd_arguments(long_run, capsys, args, named):
    assert named in error_of(capsys, "generate", "--run", str(long_run), *args)


def test_generate_samples_from_a_verified_run(long_run, capsys):
    assert main(["generate", "--run", str(long_run), "--max_new_tokens", "20", "--temperature", "0", "--prompt", "the"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the") and len(out.rstrip("\n")) == 23 and math.isfinite(len(out))
