"""The files of a comparison directory as typed models: comparison.json, cell.json, results.csv, aggregate.csv.

    comparison = read_comparison(out)               # Comparison, or UserError naming the file
    record = read_cell_record(run_dir)              # CellRecord | None (a run compare has not finished yet)
    Row = result_row_model({"training.learning_rate": float})   # results.csv, with a column per swept key
    write_csv(out / "results.csv", rows, Row)

Key and column names are the ones `tcompare compare` has always written (external scripts read
them); newer ones (the sweep, the accounting, the interval) are added, never renamed. A directory
written before they existed still reads: every newer key has a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from transformer_comparison.artifacts.io import read_json, write_json

COMPARISON_FILE = "comparison.json"
CELL_FILE = "cell.json"
FORMAT_VERSION = 2  # 2: sweeps, skipped cells, per-cell accounting (format 1 directories still read)

Scalar = Union[bool, int, float, str, None]  # a config value, as YAML and JSON write it
CellStatus = Literal["completed", "failed", "interrupted"]
RowStatus = Literal["completed", "failed", "interrupted", "pending"]


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Grid(_Artifact):
    """What varies between the runs of a comparison (the rest of the config is the same for all)."""

    attention_types: list[str]
    position_embeddings: list[str]
    seeds: int
    base_seed: int
    sweep: dict[str, list[Scalar]] = Field(default_factory=dict)  # swept key -> its values, in order
    match: Literal["params"] | None = None  # --match params: MLP width adjusted per cell


class CellEntry(_Artifact):
    """One run of the grid, as the plan made it (comparison.json `cells`)."""

    name: str
    attention_type: str
    position_embedding: str
    seed: int
    sweep: dict[str, Scalar] = Field(default_factory=dict)  # this run's value of every swept key
    adjustments: dict[str, Scalar] = Field(default_factory=dict)  # config keys compare set for this run (--match, budgets)
    non_embedding_parameters: int | None = None
    reference_non_embedding_parameters: int | None = None  # dot_product's at the same config and encoding
    training_flops_per_token: float | None = None  # forward + backward, see compare.accounting


class SkippedCell(_Artifact):
    """A mechanism x encoding the mechanism refuses (`refused_positions`), or a sweep point that
    would train the same run as another (a swept key the mechanism does not have), with the reason."""

    attention_type: str
    position_embedding: str
    reason: str
    sweep: dict[str, Scalar] = Field(default_factory=dict)


class Environment(_Artifact):
    python: str | None = None
    platform: str | None = None
    cpu_count: int | None = None
    torch: str | None = None
    cuda_devices: int | None = None
    ray: str | None = None  # ray's version with --executor ray


class Comparison(_Artifact):
    """comparison.json: the grid, the resolved config (and its hash), how it was run."""

    format: int = FORMAT_VERSION
    name: str
    preset: str | None = None
    scale: str = "full"  # "smoke": the ranking is indicative only
    note: str | None = None
    config_hash: str
    grid: Grid
    cells: list[CellEntry]
    skipped: list[SkippedCell] = Field(default_factory=list)
    budget: Literal["tokens", "time", "flops"] = "tokens"
    config_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    command: str | None = None
    jobs: int = 1
    threads_per_job: int | str = "default"
    executor: str = "local"
    created: str | None = None
    updated: str | None = None
    environment: Environment = Field(default_factory=Environment)


class CellRecord(_Artifact):
    """runs/<name>/cell.json: what compare recorded about the last process that trained the run."""

    name: str
    attention_type: str
    position_embedding: str
    seed: int
    sweep: dict[str, Scalar] = Field(default_factory=dict)
    status: CellStatus
    error: str | None = None
    returncode: int | None = None
    action: Literal["fresh", "resume"] = "fresh"
    wall_seconds: float = 0.0  # this attempt, process start-up included
    total_wall_seconds: float = 0.0  # every attempt
    attempts: int = 1
    command: str | None = None
    finished: str | None = None
    executor: str | None = None
    node: str | None = None  # the host that ran it


def read_comparison(out: str | os.PathLike[str]) -> Comparison:
    return read_json(Path(out) / COMPARISON_FILE, Comparison)


def write_comparison(out: str | os.PathLike[str], comparison: Comparison) -> None:
    write_json(Path(out) / COMPARISON_FILE, comparison)


def read_cell_record(run_dir: str | os.PathLike[str]) -> CellRecord | None:
    """The run's cell.json, or None when there is none; UserError if it is not a valid record."""
    path = Path(run_dir) / CELL_FILE
    return read_json(path, CellRecord) if path.is_file() else None


def write_cell_record(run_dir: str | os.PathLike[str], record: CellRecord) -> None:
    write_json(Path(run_dir) / CELL_FILE, record)


# ----------------------------------------------------------------------------------------------
# results.csv and aggregate.csv: a column per swept key, so the row models are built per comparison


KEY_COLUMNS = ("attention_type", "position_embedding", "seed")


class ResultRow(_Artifact):
    """results.csv: one row per run (the swept keys' columns follow `seed`, see result_row_model)."""

    attention_type: str
    position_embedding: str
    seed: int
    # the run's summary.json (empty while pending)
    final_val_loss: float | None = None
    final_val_perplexity: float | None = None
    best_val_loss: float | None = None
    tokens_per_second: float | None = None
    step_time_ms: float | None = None
    peak_memory_bytes: int | None = None
    train_time_seconds: float | None = None
    num_parameters: int | None = None
    num_kv_heads: int | None = None
    mean_attention_entropy: float | None = None  # null: a mechanism without attention distribution
    flops_per_token: float | None = None  # the model's dense estimate (summary.json)
    steps: int | None = None
    status: RowStatus = "pending"
    error: str | None = None
    # accounting (compare.accounting)
    embedding_parameters: int | None = None
    non_embedding_parameters: int | None = None
    parameter_ratio: float | None = None  # non-embedding parameters / dot_product's at the same config
    training_flops_per_token: float | None = None
    training_flops: float | None = None  # training_flops_per_token x tokens_seen
    adjustments: str | None = None  # e.g. "model.mlp_ratio=4.6875"
    # the rest of summary.json's scalars
    config_hash: str | None = None
    dataset: str | None = None
    device: str | None = None
    max_steps: int | None = None
    peak_memory_method: str | None = None
    peak_rss_bytes: int | None = None
    run_id: str | None = None
    tokens_seen: int | None = None
    torch_version: str | None = None
    world_size: int | None = None
    # compare's own
    wall_seconds: float | None = None
    attempts: int | None = None
    run: str


NOT_AGGREGATED = {"seed", "world_size", "attempts", "max_steps"}


def metric_names() -> list[str]:
    """The numeric columns of results.csv that aggregate.csv averages over seeds."""
    numeric = (int, float)
    names = []
    for name, field in ResultRow.model_fields.items():
        args = getattr(field.annotation, "__args__", (field.annotation,))
        if name not in NOT_AGGREGATED and name not in KEY_COLUMNS and any(a in numeric for a in args):
            names.append(name)
    return names


def _with_sweep(base: type[BaseModel], name: str, sweep: dict[str, type], after: str | None) -> type[BaseModel]:
    """`base`'s fields with one optional column per swept key inserted after `after`."""
    fields: dict[str, Any] = {}
    for field_name, field in base.model_fields.items():
        fields[field_name] = (field.annotation, field)
        if field_name == after:
            fields.update({key: (kind | None, None) for key, kind in sweep.items()})
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


_MODELS: dict[tuple[str, tuple[tuple[str, type], ...]], type[BaseModel]] = {}


def result_row_model(sweep: dict[str, type]) -> type[ResultRow]:
    """ResultRow with a column per swept key (e.g. `training.learning_rate`) after `seed` (one class
    per set of swept keys, so rows built twice are of the same model)."""
    key = ("result", tuple(sweep.items()))
    if key not in _MODELS:
        _MODELS[key] = _with_sweep(ResultRow, "ComparisonResultRow", sweep, "seed")
    return _MODELS[key]  # type: ignore[return-value]


class AggregateRow(_Artifact):
    """aggregate.csv: one row per cell (mechanism x encoding x swept values), over its seeds."""

    attention_type: str
    position_embedding: str
    seeds: int
    completed: int
    failed: int


def aggregate_row_model(sweep: dict[str, type]) -> type[BaseModel]:
    """AggregateRow, the swept keys after position_embedding, then `<metric>_mean` and `<metric>_std`
    for every metric, and the 95% t-interval of the validation loss."""
    key = ("aggregate", tuple(sweep.items()))
    if key not in _MODELS:
        _MODELS[key] = _aggregate_model(sweep)
    return _MODELS[key]


def _aggregate_model(sweep: dict[str, type]) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for field_name, field in AggregateRow.model_fields.items():
        fields[field_name] = (field.annotation, field)
        if field_name == "position_embedding":
            fields.update({key: (kind | None, None) for key, kind in sweep.items()})
    for metric in metric_names():
        fields[f"{metric}_mean"] = (float | None, None)
        fields[f"{metric}_std"] = (float | None, None)
    fields["final_val_loss_ci_low"] = (float | None, None)
    fields["final_val_loss_ci_high"] = (float | None, None)
    return create_model("ComparisonAggregateRow", __config__=ConfigDict(extra="forbid"), **fields)
