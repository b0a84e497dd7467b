"""DIR/mqar.csv: one typed row per (run, test length), written atomically (artifacts.io), read
back for resuming, marked with each cell's best learning rate, and summarised for plots and reports.

A run is (attention_type, position_embedding, seq_len, num_kv_pairs, d_model, learning_rate, seed);
a cell is a run without its learning rate and seed. `best_for_cell` marks, for each cell, the rows
of the learning rate with the highest mean accuracy over seeds at the runs' shortest test length
(the training length, for generated data; ties: fewer mean training steps, then the smaller
learning rate), so a cell's best is chosen once for all its seeds and test lengths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from transformer_comparison.artifacts.io import read_csv, write_csv

RUN_KEYS = ["attention_type", "position_embedding", "seq_len", "num_kv_pairs", "d_model", "learning_rate", "seed"]
CELL_KEYS = ["attention_type", "position_embedding", "seq_len", "num_kv_pairs", "d_model"]
CSV_NAME = "mqar.csv"
Status = Literal["early_stopped", "completed", "diverged", "refused", "failed"]
DONE_STATUSES = ("early_stopped", "completed", "diverged", "refused")  # "failed" runs are retried


class ProbeRow(BaseModel):
    """One row of mqar.csv: a run scored at one test length. Empty cells are None."""

    model_config = ConfigDict(extra="forbid")

    attention_type: str
    position_embedding: str
    seq_len: int  # training length L
    num_kv_pairs: int  # D (with --data: labelled positions per training example)
    d_model: int
    learning_rate: float
    seed: int  # training seed (initialisation, batch order and the generated examples)
    test_seq_len: int  # the length scored: L itself, then each --test_seq_lens value above it
    accuracy: float | None  # mean over examples of the share of labelled positions predicted right
    state_bytes: int | None  # bytes per layer held to decode the next token after test_seq_len tokens
    state_grows: bool | None = None  # whether that state is larger after twice as many tokens (a cache, not a fixed state)
    train_steps: int | None  # optimizer steps taken (early stopping ends a run before its budget)
    status: Status
    best_for_cell: bool = False
    wall_seconds: float  # the run's wall-clock time (training and every test length)
    window: int | None  # the mechanism's `window` option, if it has one
    fraction_within_window: float | None  # share of queries whose value lies within one window (generator)
    fraction_within_layers: float | None = None  # ... within the stack's reach, num_layers * (window - 1) + 1 positions
    vocab_size: int
    alpha: float | None  # the power law of the query gaps (None with --data)
    num_layers: int
    num_heads: int
    mlp: bool
    short_conv: int = 0  # model.short_conv: width of the causal convolution over q, k, v (0: none)
    num_parameters: int | None
    final_train_loss: float | None
    data: str  # "generated" or the --data directory
    note: str | None = None  # why a run was refused or failed

    @property
    def run_key(self) -> tuple:
        return (self.attention_type, self.position_embedding, self.seq_len, self.num_kv_pairs, self.d_model,
                float(f"{self.learning_rate:.12g}"), self.seed)


COLUMNS = list(ProbeRow.model_fields)


def read_rows(path: Path) -> list[ProbeRow]:
    """The rows of an existing mqar.csv ([] when there is none); UserError naming a bad line."""
    return read_csv(path, ProbeRow) if path.exists() else []


def write_rows(path: Path, rows: list[ProbeRow]) -> None:
    write_csv(path, rows, ProbeRow)


def finished_runs(rows: list[ProbeRow], test_lengths_of: dict[tuple, set[int]]) -> set[tuple]:
    """The runs (keys of test_lengths_of) whose rows cover every test length they need with a final status."""
    done: dict[tuple, set[int]] = {}
    for row in rows:
        if row.status in DONE_STATUSES:
            done.setdefault(row.run_key, set()).add(row.test_seq_len)
    return {key for key, lengths in test_lengths_of.items() if lengths <= done.get(key, set())}


def merge_rows(rows: list[ProbeRow], new: list[ProbeRow]) -> list[ProbeRow]:
    """`rows` with `new` added, replacing earlier rows of the same runs; sorted, best_for_cell recomputed."""
    replaced = {row.run_key for row in new}
    merged = [row for row in rows if row.run_key not in replaced] + list(new)
    merged.sort(key=lambda row: (*row.run_key, row.test_seq_len))
    return mark_best(merged)


def to_frame(rows: list[ProbeRow]) -> pd.DataFrame:
    """The rows as a DataFrame with the table's columns (missing values NaN)."""
    frame = pd.DataFrame([row.model_dump() for row in rows], columns=COLUMNS)
    for column in ("accuracy", "fraction_within_window", "fraction_within_layers", "state_bytes", "train_steps",
                   "window", "num_layers"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def mark_best(rows: list[ProbeRow]) -> list[ProbeRow]:
    """The rows with best_for_cell set (see the module docstring)."""
    if not rows:
        return rows
    frame = to_frame(rows)
    shortest = frame.groupby(RUN_KEYS)["test_seq_len"].transform("min")
    scored = frame[(frame["test_seq_len"] == shortest) & frame["accuracy"].notna()]
    chosen: set[tuple] = set()
    if not scored.empty:
        per_lr = scored.groupby([*CELL_KEYS, "learning_rate"], as_index=False)[["accuracy", "train_steps"]].mean()
        per_lr = per_lr.sort_values(["accuracy", "train_steps", "learning_rate"], ascending=[False, True, True], kind="stable")
        chosen = set(per_lr.drop_duplicates(CELL_KEYS)[[*CELL_KEYS, "learning_rate"]].itertuples(index=False, name=None))
    return [row.model_copy(update={"best_for_cell": (*row.run_key[:5], row.learning_rate) in chosen}) for row in rows]


def best_cells(rows: list[ProbeRow]) -> pd.DataFrame:
    """One row per (cell, test length) at the cell's best learning rate, averaged over seeds: CELL_KEYS,
    test_seq_len, accuracy (mean), accuracy_min, accuracy_max, seeds, learning_rate, state_bytes, window,
    fraction_within_window, fraction_within_layers, num_layers, state_grows."""
    columns = [*CELL_KEYS, "test_seq_len", "accuracy", "accuracy_min", "accuracy_max", "seeds", "learning_rate",
               "state_bytes", "window", "fraction_within_window", "fraction_within_layers", "num_layers", "state_grows"]
    frame = to_frame(rows)
    best = frame[frame["best_for_cell"] & frame["accuracy"].notna()]
    if best.empty:
        return pd.DataFrame(columns=columns)
    summary = best.groupby([*CELL_KEYS, "test_seq_len"], as_index=False).agg(
        accuracy=("accuracy", "mean"), accuracy_min=("accuracy", "min"), accuracy_max=("accuracy", "max"),
        seeds=("seed", "nunique"), learning_rate=("learning_rate", "first"), state_bytes=("state_bytes", "max"),
        window=("window", "first"), fraction_within_window=("fraction_within_window", "first"),
        fraction_within_layers=("fraction_within_layers", "first"), num_layers=("num_layers", "first"),
        state_grows=("state_grows", "first"),
    )
    return summary[columns]
