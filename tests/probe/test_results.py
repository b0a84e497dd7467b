"""mqar.csv rows: the best learning rate of a cell chosen once over seeds, resuming, the report section."""

from __future__ import annotations

from pathlib import Path

from transformer_comparison.probe.report import report_section
from transformer_comparison.probe.results import (
    COLUMNS,
    ProbeRow,
    best_cells,
    finished_runs,
    merge_rows,
    read_rows,
    write_rows,
)


def make(attention="dot_product", position="rope", seq_len=64, pairs=4, d_model=32, lr=1e-3, seed=1, test_len=None,
         accuracy=0.5, steps=100, status="completed", state=1000, window=None, reach=None, reach_layers=None,
         grows=None, short_conv=0) -> ProbeRow:
    return ProbeRow(attention_type=attention, position_embedding=position, seq_len=seq_len, num_kv_pairs=pairs,
                    d_model=d_model, learning_rate=lr, seed=seed, test_seq_len=test_len or seq_len, accuracy=accuracy,
                    state_bytes=state, state_grows=grows, train_steps=steps, status=status, wall_seconds=1.0, window=window,
                    fraction_within_window=reach, fraction_within_layers=reach_layers, vocab_size=256, alpha=0.01, num_layers=2, num_heads=2, mlp=False,
                    num_parameters=10, final_train_loss=1.0, data="generated", short_conv=short_conv)


def test_best_learning_rate_is_chosen_by_the_mean_over_seeds():
    rows = [make(lr=1e-3, seed=1, accuracy=1.0), make(lr=1e-3, seed=2, accuracy=0.1),   # mean 0.55
            make(lr=1e-2, seed=1, accuracy=0.7), make(lr=1e-2, seed=2, accuracy=0.6),   # mean 0.65
            make(lr=1e-2, seed=1, test_len=128, accuracy=0.2), make(lr=1e-3, seed=1, test_len=128, accuracy=0.9)]
    marked = merge_rows([], rows)
    best = {(r.learning_rate, r.seed, r.test_seq_len) for r in marked if r.best_for_cell}
    assert best == {(1e-2, 1, 64), (1e-2, 2, 64), (1e-2, 1, 128)}  # chosen at the training length, kept at 128
    summary = best_cells(marked)
    at_64 = summary[summary["test_seq_len"] == 64].iloc[0]
    assert abs(at_64["accuracy"] - 0.65) < 1e-12 and at_64["seeds"] == 2 and at_64["learning_rate"] == 1e-2


def test_ties_go_to_fewer_steps():
    marked = merge_rows([], [make(lr=1e-3, accuracy=1.0, steps=300), make(lr=3e-3, accuracy=1.0, steps=100)])
    assert [r.learning_rate for r in marked if r.best_for_cell] == [3e-3]


def test_merge_replaces_a_runs_rows_and_finished_runs_need_every_length():
    first = merge_rows([], [make(status="failed", accuracy=None)])
    again = merge_rows(first, [make(accuracy=0.9)])
    assert len(again) == 1 and again[0].status == "completed"
    key = again[0].run_key
    assert finished_runs(again, {key: {64}}) == {key}
    assert finished_runs(again, {key: {64, 128}}) == set()  # a new test length retrains the run
    assert finished_runs(first, {key: {64}}) == set()  # failed runs are retried


def test_csv_round_trip(tmp_path: Path):
    rows = merge_rows([], [make(), make(attention="local", window=16, reach=0.4, accuracy=None, status="refused")])
    path = tmp_path / "mqar.csv"
    write_rows(path, rows)
    assert path.read_text().splitlines()[0].split(",") == COLUMNS
    assert read_rows(path) == rows


def test_report_section_states_the_hardest_setting(tmp_path: Path):
    rows = []
    for length, pairs in ((64, 4), (128, 16)):
        for d_model in (32, 64):
            rows += [make("dot_product", seq_len=length, pairs=pairs, d_model=d_model, accuracy=1.0, state=length * d_model * 8,
                          grows=True),
                     make("linear", seq_len=length, pairs=pairs, d_model=d_model, accuracy=0.2 + d_model / 200,
                          state=d_model * d_model * 4, grows=False),
                     make("local", seq_len=length, pairs=pairs, d_model=d_model, accuracy=0.3, window=32, reach=0.38,
                          reach_layers=0.76, state=31 * d_model * 8, grows=False)]
    path = tmp_path / "mqar.csv"
    write_rows(path, merge_rows([], rows))
    section = report_section(path)
    assert section.setting == (128, 16)
    assert section.headers == ["mechanism", "d_model", "rope", "state bytes / layer"]
    assert ["linear", "64", "0.520", "16,384"] in section.rows
    text = section.statement
    assert "L = 128" in text and "D = 16" in text and "dot_product+rope recalls" in text
    assert "grows with the sequence (dot_product)" in text and "fixed-size state (linear, local)" in text
    assert "local (window 32) scores rope 0.30; 38% of the queries have their value within one window, 76% within the 63" in text
    assert "From d_model 32 to 64, 1 of 3 cells gain" in text
    assert section.state_plot is None  # no plot beside this csv


def test_cells_near_chance_are_named_with_the_missing_token_mixer(tmp_path: Path):
    def section_for(short_conv: int) -> str:
        rows = [make("dot_product", pairs=16, d_model=64, accuracy=0.99, grows=True, short_conv=short_conv),
                make("linear", pairs=16, d_model=64, accuracy=0.09, grows=False, short_conv=short_conv),  # 1.5 / 16 = 0.094
                make("deltanet", pairs=16, d_model=64, accuracy=0.2, grows=False, short_conv=short_conv),
                make("gla", pairs=16, d_model=64, accuracy=0.987, grows=False, short_conv=short_conv)]
        path = tmp_path / f"mqar-{short_conv}.csv"
        write_rows(path, merge_rows([], rows))
        return report_section(path).statement

    plain = section_for(0)
    assert "linear+rope score at most 1.5/D = 0.09 (answering with any value of the context scores 1/D = 0.06)" in plain
    assert "deltanet+rope score" not in plain
    assert "model.short_conv=4" in plain
    assert "linear+rope 0.09, deltanet+rope 0.20, gla+rope 0.987 fall short" in plain  # 0.987 is not shown as 0.99
    convolved = section_for(4)
    assert "linear+rope score at most 1.5/D" in convolved and "model.short_conv=4" not in convolved
