"""`tcompare probe mqar` end to end on tiny sizes: the table, resuming, the data round trip, refused
cells, the worker pool, and bad input as one-line errors with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

import transformer_comparison.attention  # noqa: F401  (registers the mechanisms)
from transformer_comparison.attention.registry import kernel_class
from transformer_comparison.cli import main
from transformer_comparison.probe.results import COLUMNS, read_rows

TASK = ["--seq_lens", "16", "--kv_pairs", "2", "--num_train", "128", "--num_test", "32"]
MODEL = ["--position_embeddings", "rope", "--d_models", "16", "--learning_rates", "1e-2", "--vocab_size", "32",
         "--batch_size", "16", "--max_steps", "8", "--eval_interval", "4", "--eval_examples", "32", "--jobs", "1"]
TINY = TASK + MODEL


def probe(*args: str) -> int:
    return main(["probe", "mqar", *args])


def test_tiny_run_writes_the_table_and_a_rerun_skips_it(tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert probe("--attention_types", "dot_product", *TINY, "--test_seq_lens", "24", "--out", str(out)) == 0
    header = (out / "mqar.csv").read_text().splitlines()[0].split(",")
    assert header == COLUMNS
    rows = read_rows(out / "mqar.csv")
    assert [(r.attention_type, r.test_seq_len) for r in rows] == [("dot_product", 16), ("dot_product", 24)]
    assert all(r.status in ("completed", "early_stopped") and r.best_for_cell for r in rows)
    assert rows[0].train_steps <= 8 and 0 <= rows[0].accuracy <= 1 and rows[1].state_bytes > rows[0].state_bytes
    assert (out / "accuracy_vs_state_bytes.png").exists() and (out / "accuracy_vs_d_model.png").exists()
    first = (out / "mqar.csv").read_bytes()
    capsys.readouterr()
    assert probe("--attention_types", "dot_product", *TINY, "--test_seq_lens", "24", "--out", str(out)) == 0
    assert "1 already in" in capsys.readouterr().out and (out / "mqar.csv").read_bytes() == first


def test_write_data_then_data_reproduces_the_generated_run(tmp_path: Path):
    generated, data, external = tmp_path / "generated", tmp_path / "data", tmp_path / "external"
    assert probe("--attention_types", "local", *TINY, "--out", str(generated)) == 0
    assert probe(*TINY, "--write_data", str(data)) == 0
    assert sorted(p.name for p in data.iterdir()) == ["test.npz", "train.npz"]
    assert probe("--attention_types", "local", *MODEL, "--data", str(data), "--out", str(external)) == 0
    ours, theirs = read_rows(generated / "mqar.csv")[0], read_rows(external / "mqar.csv")[0]
    assert theirs.data == str(data) and theirs.alpha is None and theirs.fraction_within_window is None
    assert (theirs.seq_len, theirs.num_kv_pairs, theirs.vocab_size) == (ours.seq_len, ours.num_kv_pairs, ours.vocab_size)
    assert theirs.accuracy == ours.accuracy and theirs.final_train_loss == ours.final_train_loss


def test_refused_encoding_is_a_row_with_the_reason(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(kernel_class("local"), "refused_positions", {"rope": "for this test"}, raising=False)
    out = tmp_path / "out"
    assert probe("--attention_types", "local", *TINY, "--out", str(out)) == 0
    (row,) = read_rows(out / "mqar.csv")
    assert row.status == "refused" and row.note == "for this test" and row.accuracy is None


@pytest.mark.slow
def test_worker_pool_runs_every_run(tmp_path: Path):
    out = tmp_path / "out"
    assert probe("--attention_types", "dot_product,local", *TINY[:-2], "--jobs", "2", "--out", str(out)) == 0
    rows = read_rows(out / "mqar.csv")
    assert sorted(r.attention_type for r in rows) == ["dot_product", "local"]
    assert all(r.status in ("completed", "early_stopped") for r in rows)


@pytest.mark.parametrize("args, words", [
    (["--seq_lens", "16", "--kv_pairs", "5"], "4 * D <= L"),
    (["--seq_lens", "15", "--kv_pairs", "2"], "even"),
    (["--seq_lens", "64", "--kv_pairs", "2", "--vocab_size", "64"], "V > L"),
    (["--test_seq_lens", "64", "--vocab_size", "32"], "V > L"),
    (["--attention_types", "softmaxx"], "unknown attention mechanism 'softmaxx'; registered: dot_product"),
    (["--position_embeddings", "learned"], "unknown position embedding 'learned'; registered: sinusoidal"),
    (["--seq_lens", "16,,32"], "without empty items"),
    (["--learning_rates", "fast"], "is not a number"),
    (["training.learning_rate=1e-3"], "use --learning_rates"),
    (["model.no_such_key=1"], "unknown key model.no_such_key"),
    (["--data", "nowhere", "--kv_pairs", "4"], "brings its own examples; drop --kv_pairs"),
    (["--data", "nowhere"], "is not a directory"),
    (["--write_data", "x", "--kv_pairs", "2,3"], "one --kv_pairs value"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, args, words):
    out = tmp_path / "out"
    base = [] if "--data" in args else ["--seq_lens", "16", "--kv_pairs", "2", "--vocab_size", "32"]
    assert probe(*base, *args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not out.exists()


def test_a_directory_of_other_settings_is_refused(tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert probe("--attention_types", "local", *TINY, "--out", str(out)) == 0
    capsys.readouterr()
    assert probe("--attention_types", "local", *TINY, "--alpha", "0.5", "--out", str(out)) == 2
    assert "holds a probe with other settings (alpha differ)" in capsys.readouterr().err
