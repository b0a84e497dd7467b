"""The files of a run directory as typed models: summary.json, metrics.jsonl and run.json.

    summary = read_summary(run_dir)                 # RunSummary, or UserError naming the file
    records = read_metrics(run_dir)                 # [TrainRecord | EvalRecord, ...] (a torn last line dropped)
    evals = eval_records(records)                   # the validation records, in step order
    identity = read_identity(run_dir)               # RunIdentity: run id, config hash, data fingerprint

Key names are the ones `tcompare train` has always written (external scripts read them); a value
that is not finite (a loss before the first evaluation, a rate without timed steps) is JSON null.
`attention_entropy` is null for mechanisms without an attention distribution (and before the first
evaluation). Everything is written through `artifacts.io`: atomic files, fsynced JSON lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, RootModel

from transformer_comparison.artifacts.io import append_jsonl, read_json, read_jsonl, write_json, write_jsonl

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
IDENTITY_FILE = "run.json"
CHECKPOINT_FILE = "checkpoints/latest.pt"

Status = Literal["completed", "diverged", "interrupted"]
EntropyMatrix = list[list[float]]  # layers x heads, nats


class _Artifact(BaseModel):
    """A record of a result file: unknown keys are errors, so a garbage file is never read as a result."""

    model_config = ConfigDict(extra="forbid")


class DatasetFingerprint(_Artifact):
    """What exactly a run trained on (data.prepare_data's fingerprint)."""

    dataset: str
    file_count: int
    bytes: int
    sha256: str
    split: str
    tokenizer: str
    vocab_size: int
    train_tokens: int
    val_tokens: int


class TrainRecord(_Artifact):
    """A metrics.jsonl line written every logging.log_interval steps."""

    step: int
    elapsed_seconds: float
    train_loss: float
    lr: float
    tokens_per_second: float
    step_time_ms: float


class EvalRecord(_Artifact):
    """A metrics.jsonl line written every training.eval_interval steps and at the end."""

    step: int
    elapsed_seconds: float
    val_loss: float | None
    val_perplexity: float | None
    attention_entropy: EntropyMatrix | None


MetricRecord = Union[TrainRecord, EvalRecord]


class MetricLine(RootModel[MetricRecord]):
    """One line of metrics.jsonl, whichever kind it is (`.root` is the record)."""


class RunSummary(_Artifact):
    """summary.json: the final metrics, written when a run ends (completed, diverged or interrupted)."""

    status: Status
    error: str | None = None
    attention_type: str
    position_embedding: str
    seed: int
    final_val_loss: float | None
    final_val_perplexity: float | None
    best_val_loss: float | None
    tokens_per_second: float | None
    step_time_ms: float | None
    peak_memory_bytes: int
    peak_memory_method: str
    peak_rss_bytes: int | None = None
    train_time_seconds: float
    attention_entropy: EntropyMatrix | None
    mean_attention_entropy: float | None
    num_parameters: int
    num_kv_heads: int
    flops_per_token: int | float
    world_size: int
    steps: int
    max_steps: int
    tokens_seen: int
    device: str
    torch_version: str
    dataset: DatasetFingerprint
    run_id: str | None = None  # the run's identity (run.json); absent in runs written before it existed
    config_hash: str | None = None


class RunIdentity(_Artifact):
    """run.json, written once when a run is created: what its checkpoints must match on resume."""

    run_id: str
    created: str  # ISO 8601, local time
    config_hash: str  # resume.config_hash() of the config, without the keys a resume may change
    config: dict[str, Any] = {}  # that config by dotted key, so a change can be named key by key
    dataset: DatasetFingerprint
    tokenizer_identity: str


def summary_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_summary(run_dir: str | os.PathLike[str]) -> RunSummary:
    """The run's summary.json; UserError (naming the file) if it is missing or not a valid summary."""
    return read_json(summary_path(run_dir), RunSummary)


def write_summary(run_dir: str | os.PathLike[str], summary: RunSummary) -> None:
    write_json(summary_path(run_dir), summary)


def read_metrics_with_tail(run_dir: str | os.PathLike[str]) -> tuple[list[MetricRecord], bool]:
    """The records of metrics.jsonl and whether a torn final line (a crash mid-write) was dropped."""
    lines, torn = read_jsonl(metrics_path(run_dir), MetricLine, drop_torn_tail=True)
    return [line.root for line in lines], torn


def read_metrics(run_dir: str | os.PathLike[str]) -> list[MetricRecord]:
    """The records of metrics.jsonl ([] when there is none); a torn final line is left out."""
    return read_metrics_with_tail(run_dir)[0]


def append_metric(run_dir: str | os.PathLike[str], record: MetricRecord) -> None:
    append_jsonl(metrics_path(run_dir), record)


def write_metrics(run_dir: str | os.PathLike[str], records: list[MetricRecord]) -> None:
    """Replace metrics.jsonl with these records, atomically."""
    write_jsonl(metrics_path(run_dir), records)


def train_records(records: list[MetricRecord]) -> list[TrainRecord]:
    return [r for r in records if isinstance(r, TrainRecord)]


def eval_records(records: list[MetricRecord]) -> list[EvalRecord]:
    return [r for r in records if isinstance(r, EvalRecord)]


def read_identity(run_dir: str | os.PathLike[str]) -> RunIdentity:
    return read_json(Path(run_dir) / IDENTITY_FILE, RunIdentity)


def write_identity(run_dir: str | os.PathLike[str], identity: RunIdentity) -> None:
    write_json(Path(run_dir) / IDENTITY_FILE, identity)
