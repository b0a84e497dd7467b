"""results.csv, results.json and aggregate.csv: one typed row per run, and per cell over its seeds (pandas).

Everything is read from the comparison directory: comparison.json (the grid and each cell's
accounting), and per run summary.json, metrics.jsonl and cell.json. A run directory written before
the accounting existed gets it from its summary (embedding = vocabulary x d_model, tied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, RootModel

from transformer_comparison.artifacts.comparison import (CellEntry, Comparison, ResultRow, aggregate_row_model, metric_names,
                                                         read_cell_record, read_comparison, result_row_model)
from transformer_comparison.artifacts.io import write_csv, write_json
from transformer_comparison.artifacts.run import EvalRecord, RunSummary, eval_records, read_metrics, read_summary
from transformer_comparison.errors import UserError
from transformer_comparison.report.statistics import estimate

CELL_KEYS = ["attention_type", "position_embedding"]


def load_comparison(out: Path) -> Comparison:
    if not (out / "comparison.json").is_file():
        raise UserError(f"{out} holds no comparison.json: not a `tcompare compare` output directory")
    return read_comparison(out)


def sweep_keys(comparison: Comparison) -> list[str]:
    return list(comparison.grid.sweep)


def sweep_types(comparison: Comparison) -> dict[str, type]:
    """The column type of each swept key (str when its values mix types)."""
    types: dict[str, type] = {}
    for key, values in comparison.grid.sweep.items():
        kinds = {type(v) for v in values if v is not None}
        types[key] = float if kinds <= {int, float} and float in kinds else (kinds.pop() if len(kinds) == 1 else str)
    return types


@dataclass
class RunFiles:
    """What a run directory holds, read once (None where a file is missing or unreadable)."""

    summary: RunSummary | None
    summary_error: str | None
    evals: list[EvalRecord]

    @staticmethod
    def read(run_dir: Path) -> RunFiles:
        summary, error = None, None
        if (run_dir / "summary.json").is_file():
            try:
                summary = read_summary(run_dir)
            except UserError as problem:
                error = str(problem)
        try:
            evals = [r for r in eval_records(read_metrics(run_dir)) if r.val_loss is not None and math.isfinite(r.val_loss)]
        except UserError:
            evals = []
        return RunFiles(summary, error, evals)


def run_status(files: RunFiles, run_dir: Path) -> tuple[str, str | None, Any]:
    """completed | failed | interrupted | pending, the error message, and the cell record."""
    try:
        record = read_cell_record(run_dir)
    except UserError as error:
        return "failed", str(error), None
    summary = files.summary
    if summary is not None and summary.status == "completed" and (record is None or record.status == "completed"):
        return "completed", None, record
    if record is not None:
        return record.status, record.error, record
    if summary is not None:
        return ("interrupted" if summary.status == "interrupted" else "failed"), summary.error or f"run ended with status {summary.status}", None
    if files.summary_error:
        return "failed", files.summary_error, None
    return "pending", None, None


def _accounting(cell: CellEntry, summary: RunSummary | None, config: dict[str, Any]) -> dict[str, Any]:
    non_embedding = cell.non_embedding_parameters
    embedding = None
    if summary is not None:
        if non_embedding is None:  # written before compare recorded the split: the tied embedding is vocab x d_model
            vocab = config.get("model", {}).get("vocab_size") or summary.dataset.vocab_size
            embedding = vocab * int(config.get("model", {}).get("d_model") or 0)
            non_embedding = summary.num_parameters - embedding
        else:
            embedding = summary.num_parameters - non_embedding
    reference = cell.reference_non_embedding_parameters
    flops = cell.training_flops_per_token
    return {
        "embedding_parameters": embedding,
        "non_embedding_parameters": non_embedding,
        "parameter_ratio": non_embedding / reference if non_embedding and reference else None,
        "training_flops_per_token": flops,
        "training_flops": flops * summary.tokens_seen if flops is not None and summary is not None else None,
        "adjustments": "; ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.adjustments.items()
                                 if not k.endswith(("flop_budget", "num_epochs"))) or None,
    }


def run_row(out: Path, cell: CellEntry, comparison: Comparison, model: type[ResultRow]) -> tuple[ResultRow, RunFiles]:
    run_dir = out / "runs" / cell.name
    files = RunFiles.read(run_dir)
    status, error, record = run_status(files, run_dir)
    values: dict[str, Any] = {"attention_type": cell.attention_type, "position_embedding": cell.position_embedding,
                              "seed": cell.seed, **cell.sweep}
    summary = files.summary
    if summary is not None:
        data = summary.model_dump()
        values.update({k: v for k, v in data.items() if k in model.model_fields and k not in values and not isinstance(v, (dict, list))})
        values["dataset"] = summary.dataset.dataset
    values.update(_accounting(cell, summary, comparison.config))
    values.update(status=status, error=error, run=f"runs/{cell.name}",
                  wall_seconds=record.total_wall_seconds if record else None, attempts=record.attempts if record else None)
    return model.model_validate(values), files


def collect_rows(out: Path, comparison: Comparison | None = None) -> tuple[list[ResultRow], list[RunFiles]]:
    comparison = comparison or load_comparison(out)
    model = result_row_model(sweep_types(comparison))
    pairs = [run_row(out, cell, comparison, model) for cell in comparison.cells]
    return [row for row, _ in pairs], [files for _, files in pairs]


def frame(rows: list[ResultRow]) -> pd.DataFrame:
    """The rows as a DataFrame, metric columns numeric (missing: NaN)."""
    table = pd.DataFrame([row.model_dump() for row in rows])
    for metric in metric_names():
        if metric in table:
            table[metric] = pd.to_numeric(table[metric], errors="coerce")
    return table


def aggregate(rows: list[ResultRow], keys: list[str]) -> pd.DataFrame:
    """Per cell (mechanism, encoding, swept values): seeds, completed, failed, then mean and sample std
    of every metric over the completed seeds, and the 95% t-interval of the validation loss."""
    table = frame(rows)
    if table.empty:
        return pd.DataFrame(columns=[*CELL_KEYS, *keys, "seeds", "completed", "failed"])
    group_keys = [*CELL_KEYS, *keys]
    entries = []
    for values, group in table.groupby(group_keys, sort=False, dropna=False):
        done = group[group["status"] == "completed"]
        entry: dict[str, Any] = dict(zip(group_keys, values if isinstance(values, tuple) else (values,)))
        entry.update(seeds=len(group), completed=len(done), failed=int((group["status"] == "failed").sum()))
        for metric in metric_names():
            column = done[metric].dropna()
            entry[f"{metric}_mean"] = float(column.mean()) if len(column) else None
            entry[f"{metric}_std"] = float(column.std()) if len(column) > 1 else None
        interval = estimate(done["final_val_loss"].tolist())
        entry["final_val_loss_ci_low"] = interval.low if interval else None
        entry["final_val_loss_ci_high"] = interval.high if interval else None
        entries.append(entry)
    return pd.DataFrame(entries)


def _none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def aggregate_models(table: pd.DataFrame, comparison: Comparison) -> list[BaseModel]:
    model = aggregate_row_model(sweep_types(comparison))
    return [model.model_validate({k: _none(v) for k, v in record.items()}) for record in table.to_dict("records")]


def write_results(out: Path) -> list[ResultRow]:
    """Rewrite results.csv, results.json and aggregate.csv from the run directories; returns the rows."""
    out = Path(out)
    comparison = load_comparison(out)
    rows, _ = collect_rows(out, comparison)
    model = result_row_model(sweep_types(comparison))
    write_csv(out / "results.csv", rows, model)
    write_json(out / "results.json", RootModel[list[model]](rows))  # type: ignore[valid-type]
    table = aggregate(rows, sweep_keys(comparison))
    write_csv(out / "aggregate.csv", aggregate_models(table, comparison), aggregate_row_model(sweep_types(comparison)))
    return rows
