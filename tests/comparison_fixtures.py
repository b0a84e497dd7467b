"""Synthetic comparison directories for the report tests (no training), written through the same
typed models `tcompare compare` and `tcompare train` write them with."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformer_comparison.artifacts.comparison import (CellEntry, CellRecord, Comparison, Environment, Grid, SkippedCell,
                                                         write_cell_record, write_comparison)
from transformer_comparison.artifacts.run import DatasetFingerprint, EvalRecord, RunSummary, TrainRecord, write_metrics, write_summary

LAYERS, HEADS, D_MODEL, VOCAB = 2, 4, 64, 27
NON_EMBEDDING = 100_000


def dataset() -> DatasetFingerprint:
    return DatasetFingerprint(dataset="tiny", file_count=1, bytes=1000, sha256="abc", split="last 10%", tokenizer="char",
                              vocab_size=VOCAB, train_tokens=900, val_tokens=100)


def entropy_matrix(seed: int) -> list[list[float]]:
    return [[1.0 + 0.1 * layer + 0.05 * head + 0.01 * seed for head in range(HEADS)] for layer in range(LAYERS)]


def write_run(out: Path, cell: CellEntry, loss: float, status: str = "completed", error: str | None = None,
              entropy: bool = True, extrapolation: bool = False) -> None:
    run = out / "runs" / cell.name
    run.mkdir(parents=True)
    matrix = entropy_matrix(cell.seed) if entropy else None
    non_embedding = cell.non_embedding_parameters or NON_EMBEDDING
    if status in ("completed", "diverged"):
        finite = math.isfinite(loss)
        summary = RunSummary(
            status=status, error=error, attention_type=cell.attention_type, position_embedding=cell.position_embedding,
            seed=cell.seed, final_val_loss=loss if finite else None, final_val_perplexity=math.exp(loss) if finite else None,
            best_val_loss=loss - 0.01 if finite else None, tokens_per_second=5000.0 + 100 * cell.seed, step_time_ms=30.0,
            peak_memory_bytes=8 * 2**20 + cell.seed, peak_memory_method="MemTracker", train_time_seconds=12.5,
            attention_entropy=matrix, mean_attention_entropy=sum(map(sum, matrix)) / (LAYERS * HEADS) if matrix else None,
            num_parameters=non_embedding + VOCAB * D_MODEL, num_kv_heads=HEADS, flops_per_token=600_000, world_size=1,
            steps=100, max_steps=100, tokens_seen=204_800, device="cpu", torch_version="2.x", dataset=dataset())
        write_summary(run, summary)
        records: list[Any] = []
        for step in (50, 100):
            records.append(TrainRecord(step=step, elapsed_seconds=step * 0.1, train_loss=loss + 1 if finite else 9.0, lr=1e-3,
                                       tokens_per_second=5000.0, step_time_ms=30.0))
            records.append(EvalRecord(step=step, elapsed_seconds=step * 0.1, val_loss=loss + (100 - step) / 100 if finite else None,
                                      val_perplexity=math.exp(loss) if finite else None, attention_entropy=matrix))
        write_metrics(run, records)
        with (run / "metrics.jsonl").open("a") as handle:
            handle.write('{"step": 1')  # a line cut short by a kill
    write_cell_record(run, CellRecord(name=cell.name, attention_type=cell.attention_type, position_embedding=cell.position_embedding,
                                      seed=cell.seed, sweep=cell.sweep, status="completed" if status == "completed" else "failed",
                                      error=error, returncode=0 if status == "completed" else 1, wall_seconds=15.0,
                                      total_wall_seconds=15.0, attempts=1))
    if extrapolation:
        lines = ["eval_length,stride,val_loss,val_perplexity,train_context_length"]
        for n in (64, 128, 256):
            lines.append(f"{n},{n},{loss + n / 256},{math.exp(loss + n / 256)},64")
        (run / "extrapolation.csv").write_text("\n".join(lines) + "\n")


Loss = Callable[[CellEntry], float]


def default_loss(attention: list[str], position: list[str]) -> Loss:
    return lambda c: 2.0 + 0.1 * attention.index(c.attention_type) + 0.05 * position.index(c.position_embedding) + 0.01 * c.seed


def make_comparison(out: Path, attention: list[str], position: list[str], seeds: int = 1, sweep: dict[str, list] | None = None,
                    loss: Loss | None = None, preset: str | None = None, parameters: Callable[[CellEntry], int] | None = None,
                    no_entropy: tuple[str, ...] = (), failed: tuple[str, ...] = (), skipped: list[SkippedCell] | None = None,
                    extras: bool = False, budget: str = "tokens", config: dict[str, Any] | None = None) -> Comparison:
    """A comparison directory with one completed run per cell (the named ones diverged instead)."""
    sweep = sweep or {}
    loss = loss or default_loss(attention, position)
    cells = []
    for a, p, *values in itertools.product(attention, position, *sweep.values()):
        point = dict(zip(sweep, values))
        label = "-".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
        for s in range(1, seeds + 1):
            cell = CellEntry(name=f"{a}-{p}-{label + '-' if label else ''}seed{s}", attention_type=a, position_embedding=p,
                             seed=s, sweep=point, reference_non_embedding_parameters=NON_EMBEDDING,
                             training_flops_per_token=6.0 * NON_EMBEDDING)
            own = parameters(cell) if parameters else NON_EMBEDDING
            cells.append(cell.model_copy(update={"non_embedding_parameters": own, "training_flops_per_token": 6.0 * own}))
    comparison = Comparison(
        name="synthetic", preset=preset, scale="smoke" if preset == "quick" else "full",
        note="Smoke-scale comparison (preset `quick`)." if preset == "quick" else None, config_hash="0" * 64,
        grid=Grid(attention_types=attention, position_embeddings=position, seeds=seeds, base_seed=1, sweep=sweep),
        cells=cells, skipped=skipped or [], budget=budget,
        config=config or {"model": {"num_layers": LAYERS, "num_heads": HEADS, "d_model": D_MODEL, "context_length": 64},
                          "training": {"max_steps": 100, "batch_size": 8}, "data": {"dataset": "tiny", "tokenizer": "char"}},
        command="tcompare compare ...", environment=Environment(python="3", platform="test", cpu_count=2))
    out.mkdir(parents=True)
    write_comparison(out, comparison)
    (out / "comparison_config.yaml").write_text("model:\n  d_model: 64\n")
    for cell in cells:
        if cell.name in failed:
            write_run(out, cell, float("nan"), status="diverged", error="training diverged: loss is nan at step 7")
        else:
            write_run(out, cell, loss(cell), entropy=cell.attention_type not in no_entropy, extrapolation=extras)
    if extras:
        write_benchmarks(out, attention)
    return comparison


def write_benchmarks(out: Path, attention: list[str]) -> None:
    bench = out / "bench"
    bench.mkdir()
    rows = ["mechanism,seq_len,pass,time_ms,peak_memory_bytes,status,threads"]
    for a in attention:
        for n in (128, 256, 512):
            for p in ("forward", "forward_backward"):
                rows.append(f"{a},{n},{p},{n * n / 1e4},{n * n * 16},ok,2")
    rows.append("dot_product,1024,forward,,,oom,2")
    (bench / "kernels.csv").write_text("\n".join(rows) + "\n")
    rows = ["mechanism,position_embedding,context_length,ms_per_token,cache_bytes,status"]
    for a in attention:
        for n in (64, 128, 256):
            rows.append(f"{a},rope,{n},{0.1 + n / 1000},{n * 1024},ok")
    (bench / "decode.csv").write_text("\n".join(rows) + "\n")
    (out / "extras.json").write_text('[{"name": "bench kernels", "status": "completed", "error": null, "log": "bench/kernels.log"}, '
                                     '{"name": "bench decode", "status": "unavailable", "error": "not installed", "log": null}]')
