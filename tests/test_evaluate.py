"""`tcompare eval` (length extrapolation): CSV, window arithmetic, agreement with training's evaluation, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import read_csv, run_cli, tiny_config
from transformer_comparison.attention import ATTENTION_TYPES
from transformer_comparison.cli import main
from transformer_comparison.config import load_config
from transformer_comparison.data import prepare_data
from transformer_comparison.evaluate import (
    CSV_COLUMNS, evaluate_lengths, plot_extrapolation, read_extrapolation_csv, score_windows, window_plan,
)
from transformer_comparison.generate import load_run
from transformer_comparison.model import GPT, GPTConfig
from transformer_comparison.position import POSITION_TYPES
from transformer_comparison.runtime import Runtime
from transformer_comparison.validation import evaluate, validation_windows

CONTEXT = 16


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run at context 16 whose evaluations use the whole validation split (eval_batches null)."""
    folder = tmp_path_factory.mktemp("eval_run")
    config = tiny_config(folder, model={"context_length": CONTEXT},
                         training={"max_steps": 24, "eval_interval": 24, "eval_batches": None, "learning_rate": 3e-3})
    run_dir = folder / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 0
    return run_dir


def validation_tokens(run_dir: Path) -> np.ndarray:
    cfg = load_config(run_dir / "config.yaml")
    return prepare_data(cfg.data, cfg.model.vocab_size).val


def test_eval_writes_csv_plot_and_table(trained_run, capsys):
    assert main(["eval", "--run", str(trained_run), "--lengths", "16,32,64"]) == 0
    columns, rows = read_csv(trained_run / "extrapolation.csv")
    assert columns[:4] == ["eval_length", "stride", "val_loss", "val_perplexity"] and columns == CSV_COLUMNS
    assert [int(r["eval_length"]) for r in rows] == [16, 32, 64]
    n = len(validation_tokens(trained_run))
    for row in rows:
        length = int(row["eval_length"])
        assert int(row["stride"]) == length
        assert int(row["num_windows"]) == (n - 1) // length  # non-overlapping windows over the whole split
        assert int(row["tokens_scored"]) == int(row["num_windows"]) * length
        assert math.isclose(float(row["val_perplexity"]), math.exp(float(row["val_loss"])), rel_tol=1e-12)
        assert int(row["train_context_length"]) == CONTEXT
        assert (row["attention_type"], row["position_embedding"]) == ("dot_product", "sinusoidal")
    assert (trained_run / "extrapolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "eval_length" in out and "(training context)" in out and "extrapolation.csv" in out


def test_loss_at_training_context_equals_training_evaluation(trained_run):
    """Same windows as `tcompare train` with eval_batches null, and the same loss within 1e-6."""
    cfg = load_config(trained_run / "config.yaml")
    val = validation_tokens(trained_run)
    plan = window_plan(len(val), CONTEXT)
    assert np.array_equal(plan.starts, validation_windows(val, cfg))
    assert (plan.score_from == 0).all()

    model, _, _ = load_run(trained_run)
    direct = evaluate(model, val, plan.starts, cfg, Runtime(torch.device("cpu"), 0, 1, None))
    assert abs(score_windows(model, val, plan, batch_size=7, device=torch.device("cpu")) - direct) < 1e-6

    summary = json.loads((trained_run / "summary.json").read_text())
    out = trained_run.parent / "at_context.csv"
    assert main(["eval", "--run", str(trained_run), "--lengths", str(CONTEXT), "--out", str(out)]) == 0
    (row,) = read_extrapolation_csv(out)
    assert abs(row["val_loss"] - summary["final_val_loss"]) < 1e-6
    assert abs(row["val_loss"] - direct) < 1e-6


@pytest.mark.parametrize("num_tokens,length,stride", [(100, 16, 16), (100, 16, 5), (100, 16, 1), (17, 16, 4), (250, 32, 7)])
def test_sliding_windows_score_every_target_once(num_tokens, length, stride):
    plan = window_plan(num_tokens, length, stride)
    count = np.zeros(num_tokens, dtype=int)  # how often each token is scored as a target
    for start, first in zip(plan.starts, plan.score_from):
        count[start + 1 + first : start + 1 + length] += 1
    last = length + (plan.num_windows - 1) * stride  # documented: targets 1 .. L + (W - 1) S
    assert plan.num_windows == (num_tokens - 1 - length) // stride + 1
    assert plan.tokens_scored == last == count.sum()
    assert (count[1 : last + 1] == 1).all() and count[0] == 0 and (count[last + 1 :] == 0).all()
    assert num_tokens - 1 - last < stride  # fewer than S targets at the end are left out
    assert int(plan.starts[-1]) + length + 1 <= num_tokens
    # the non-overlapping windows score the same prefix of targets, up to fewer than L at the end
    assert abs(plan.tokens_scored - window_plan(num_tokens, length).tokens_scored) < length


def test_no_window_fits_and_max_windows():
    assert window_plan(16, 16).num_windows == 0
    capped = window_plan(1000, 16, 4, max_windows=3)
    assert capped.starts.tolist() == [0, 4, 8] and capped.tokens_scored == 16 + 2 * 4


def test_sliding_eval_end_to_end(trained_run):
    n = len(validation_tokens(trained_run))
    sliding, plain, capped = (trained_run.parent / f"{name}.csv" for name in ("sliding", "plain", "capped"))
    assert main(["eval", "--run", str(trained_run), "--lengths", "16", "32", "--stride", "8", "--out", str(sliding)]) == 0
    assert main(["eval", "--run", str(trained_run), "--lengths", "16,32", "--out", str(plain)]) == 0
    assert main(["eval", "--run", str(trained_run), "--lengths", "32", "--stride", "32", "--max_windows", "3",
                 "--batch_size", "2", "--out", str(capped)]) == 0
    for row, plain_row in zip(read_extrapolation_csv(sliding), read_extrapolation_csv(plain)):
        length = row["eval_length"]
        assert row["stride"] == 8 and row["num_windows"] == (n - 1 - length) // 8 + 1
        assert row["tokens_scored"] == length + (row["num_windows"] - 1) * 8
        assert abs(row["tokens_scored"] - plain_row["tokens_scored"]) < length
        assert math.isfinite(row["val_loss"])
    (row,) = read_extrapolation_csv(capped)
    assert (row["num_windows"], row["tokens_scored"]) == (3, 96)
    # --stride L is the non-overlapping evaluation; its first 3 windows, whatever the batch size
    model, _, _ = load_run(trained_run)
    val = validation_tokens(trained_run)
    assert math.isclose(row["val_loss"], score_windows(model, val, window_plan(len(val), 32, max_windows=3), 64, torch.device("cpu")),
                        rel_tol=1e-9)


def test_too_long_lengths_are_skipped(trained_run, capsys):
    n = len(validation_tokens(trained_run))
    out = trained_run.parent / "skipped.csv"
    assert main(["eval", "--run", str(trained_run), "--lengths", f"16,{n}", "--out", str(out)]) == 0
    assert [r["eval_length"] for r in read_extrapolation_csv(out)] == [16]
    captured = capsys.readouterr()
    assert f"skipping length {n}" in captured.err and "skipped" in captured.out


def bad_inputs(run: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"  # created by the test
    return {
        "missing run": (["--run", str(tmp / "nope"), "--lengths", "16"], "does not exist"),
        "not a run": (["--run", str(empty), "--lengths", "16"], "config.yaml is missing"),
        "zero length": (["--run", str(run), "--lengths", "16,0"], "positive integer"),
        "negative length": (["--run", str(run), "--lengths", "16,-4"], "positive integer"),
        "non-integer length": (["--run", str(run), "--lengths", "sixteen"], "positive integer"),
        "empty lengths": (["--run", str(run), "--lengths", ","], "empty"),
        "stride zero": (["--run", str(run), "--lengths", "16", "--stride", "0"], "positive integer"),
        "stride above length": (["--run", str(run), "--lengths", "16,32", "--stride", "17"], "larger than the evaluation length 16"),
        "max_windows zero": (["--run", str(run), "--lengths", "16", "--max_windows", "0"], "positive integer"),
        "batch_size text": (["--run", str(run), "--lengths", "16", "--batch_size", "x"], "positive integer"),
        "no length fits": (["--run", str(run), "--lengths", "100000"], "no evaluation length fits"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("r"), Path("t"))))
def test_bad_input_exits_2_with_one_line(trained_run, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    argv, message = bad_inputs(trained_run, tmp_path)[case]
    out = tmp_path / "never.csv"
    assert main(["eval", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tcompare eval: error:") and message in err, err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_tokenizer_mismatch_is_refused(trained_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("extrapolation.*"))
    state = json.loads((copy / "tokenizer.json").read_text())
    assert "Q" not in state["chars"]
    state["chars"] = state["chars"][:-1] + "Q"  # (the chars are kept sorted) same vocabulary size, other ids
    (copy / "tokenizer.json").write_text(json.dumps(state))
    assert main(["eval", "--run", str(copy), "--lengths", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.json" in err
    assert not (copy / "extrapolation.csv").exists()


def test_cli_subprocess_one_line_error(tmp_path):
    result = run_cli("eval", "--run", str(tmp_path / "missing"), "--lengths", "64,128")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and not result.stdout


@pytest.mark.parametrize("position", POSITION_TYPES)
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_models_evaluate_at_four_times_their_context(attention_type, position):
    torch.manual_seed(0)
    context = 8
    model = GPT(GPTConfig(vocab_size=11, context_length=context, d_model=16, num_heads=2, num_layers=1,
                          attention_type=attention_type, position_embedding=position))
    tokens = np.random.default_rng(0).integers(0, 11, size=200)
    rows, skipped = evaluate_lengths(model, tokens, [context, 4 * context], batch_size=3)
    assert not skipped and [r["eval_length"] for r in rows] == [context, 4 * context]
    assert all(math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < 2 * math.log(11) for r in rows)
    assert rows[1]["num_windows"] == (200 - 1) // (4 * context)


def test_plot_extrapolation_draws_several_runs(tmp_path):
    rows_a = [{"eval_length": n, "val_perplexity": p, "train_context_length": 64} for n, p in [(64, 5.0), (128, 7.5), (256, 40.0)]]
    rows_b = [{"eval_length": "64", "val_perplexity": "5.1", "train_context_length": "64"},
              {"eval_length": "128", "val_perplexity": "nan", "train_context_length": "64"}]  # e.g. from csv.DictReader
    path = plot_extrapolation({"sinusoidal": rows_a, "alibi": rows_b, "empty": []}, tmp_path / "sub" / "x.png")
    assert path == tmp_path / "sub" / "x.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_extrapolation({}, tmp_path / "none.png").is_file()


def test_rope_scaling_at_evaluation(tmp_path, capsys):
    """--rope_scaling rebuilds the run's model with a scaled RoPE: the same weights, the same loss at
    the training context for factor 1, other losses beyond it; a run without RoPE is refused."""
    config = tiny_config(tmp_path, model={"context_length": CONTEXT}, position={"type": "rope"},
                         training={"max_steps": 12, "eval_interval": 12, "eval_batches": None})
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir)]) == 0
    assert main(["eval", "--run", str(run_dir), "--lengths", "16,64", "--out", str(tmp_path / "plain.csv")]) == 0
    assert main(["eval", "--run", str(run_dir), "--lengths", "16,64", "--rope_scaling", "yarn",
                 "--out", str(tmp_path / "yarn.csv")]) == 0
    assert main(["eval", "--run", str(run_dir), "--lengths", "16", "--rope_scaling", "linear",
                 "--rope_scaling_factor", "1", "--out", str(tmp_path / "one.csv")]) == 0
    _, plain = read_csv(tmp_path / "plain.csv")
    _, yarn = read_csv(tmp_path / "yarn.csv")
    _, one = read_csv(tmp_path / "one.csv")
    assert [r["position_scaling"] for r in plain] == ["none", "none"]
    assert [r["position_scaling"] for r in yarn] == ["yarn:4", "yarn:4"]  # default factor: 64 / 16
    assert one[0]["val_loss"] == plain[0]["val_loss"]  # factor 1 is plain RoPE
    assert yarn[1]["val_loss"] != plain[1]["val_loss"] and math.isfinite(float(yarn[1]["val_loss"]))
    assert main(["eval", "--run", str(run_dir), "--lengths", "16,64"]) == 0  # the default files: one per scaling
    assert main(["eval", "--run", str(run_dir), "--lengths", "16,64", "--rope_scaling", "yarn"]) == 0
    assert (run_dir / "extrapolation.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()
    assert (run_dir / "extrapolation-yarn4.csv").read_bytes() == (tmp_path / "yarn.csv").read_bytes()
    assert (run_dir / "extrapolation-yarn4.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir.parent / "run"), "--lengths", "16", "--rope_scaling", "cubic"]) == 2
    assert "position.rope.scaling" in capsys.readouterr().err


def test_rope_scaling_needs_a_scalable_encoding(trained_run, capsys):
    assert main(["eval", "--run", str(trained_run), "--lengths", "16", "--rope_scaling", "ntk"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--rope_scaling needs a run whose encoding can be scaled" in err and "sinusoidal" in err
