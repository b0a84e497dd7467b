"""report.py on synthetic comparison directories (no training): results tables, report.md/html, `tcompare report`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.helpers import read_csv
from transformer_comparison import report
from transformer_comparison.cli import main

ATTENTION = ["dot_product", "gqa"]
POSITION = ["rope", "alibi"]


def write_run(out: Path, attention: str, position: str, seed: int, status: str = "completed", loss: float = 2.0,
              error: str | None = None, kv_heads: int = 4, extrapolation: bool = False) -> None:
    name = f"{attention}-{position}-seed{seed}"
    run = out / "runs" / name
    run.mkdir(parents=True)
    layers, heads = 2, 4
    entropy = [[1.0 + 0.1 * layer + 0.05 * head + 0.01 * seed for head in range(heads)] for layer in range(layers)]
    params = 100_000 if kv_heads == 4 else 92_000
    if status in ("completed", "diverged"):
        summary = {
            "status": status, "error": error, "attention_type": attention, "position_embedding": position, "seed": seed,
            "final_val_loss": loss, "final_val_perplexity": math.exp(loss), "best_val_loss": loss - 0.01,
            "tokens_per_second": 5000.0 + 100 * seed, "step_time_ms": 30.0, "peak_memory_bytes": 8 * 2**20 + seed,
            "peak_memory_method": "MemTracker", "train_time_seconds": 12.5, "attention_entropy": entropy,
            "mean_attention_entropy": sum(map(sum, entropy)) / (layers * heads), "num_parameters": params,
            "num_kv_heads": kv_heads, "flops_per_token": 600_000, "world_size": 1, "steps": 100, "tokens_seen": 204800,
            "device": "cpu", "torch_version": "2.x", "dataset": {"dataset": "tiny", "sha256": "abc", "vocab_size": 27},
        }
        (run / "summary.json").write_text(json.dumps(summary))
        records = []
        for step in (50, 100):
            records.append({"step": step, "elapsed_seconds": step * 0.1, "train_loss": loss + 1, "lr": 1e-3})
            records.append({"step": step, "elapsed_seconds": step * 0.1, "val_loss": loss + (100 - step) / 100,
                            "val_perplexity": math.exp(loss), "attention_entropy": entropy})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 1')  # a cut-off line
    record = {"name": name, "status": "completed" if status == "completed" else "failed", "error": error,
              "returncode": 0 if status == "completed" else 1, "action": "fresh", "wall_seconds": 15.0,
              "total_wall_seconds": 15.0, "attempts": 1}
    (run / "cell.json").write_text(json.dumps(record))
    if extrapolation:
        lines = ["eval_length,stride,val_loss,val_perplexity"]
        for n in (64, 128, 256):
            lines.append(f"{n},{n},{loss + n / 256},{math.exp(loss + n / 256)}")
        (run / "extrapolation.csv").write_text("\n".join(lines) + "\n")


def make_comparison(out: Path, seeds: int = 1, preset: str | None = None, fail: bool = True, extras: bool = False) -> None:
    out.mkdir(parents=True)
    cells = [{"name": f"{a}-{p}-seed{s}", "attention_type": a, "position_embedding": p, "seed": s}
             for a in ATTENTION for p in POSITION for s in range(1, seeds + 1)]
    comparison = {
        "format": 1, "name": "synthetic", "preset": preset, "scale": "smoke" if preset == "quick" else "full",
        "note": "Smoke-scale comparison (preset `quick`)." if preset == "quick" else None,
        "config_hash": "0" * 64, "cells": cells,
        "grid": {"attention_types": ATTENTION, "position_embeddings": POSITION, "seeds": seeds, "base_seed": 1},
        "config": {"model": {"num_layers": 2, "num_heads": 4, "d_model": 64, "context_length": 64},
                   "training": {"max_steps": 100, "batch_size": 8}, "data": {"dataset": "tiny", "tokenizer": "char"}},
        "command": "tcompare compare ...", "environment": {"python": "3", "platform": "test", "cpu_count": 2},
    }
    (out / "comparison.json").write_text(json.dumps(comparison))
    (out / "comparison_config.yaml").write_text("model:\n  d_model: 64\n")
    for cell in cells:
        a, p, s = cell["attention_type"], cell["position_embedding"], cell["seed"]
        if fail and (a, p, s) == ("gqa", "alibi", 1):
            write_run(out, a, p, s, status="diverged", loss=float("nan"), error="training diverged: loss is nan at step 7", kv_heads=2)
        else:
            loss = 2.0 + 0.1 * ATTENTION.index(a) + 0.05 * POSITION.index(p) + 0.01 * s
            write_run(out, a, p, s, loss=loss, kv_heads=2 if a == "gqa" else 4, extrapolation=extras)
    if extras:
        bench = out / "bench"
        bench.mkdir()
        rows = ["mechanism,seq_len,pass,time_ms,peak_memory_bytes,status,threads"]
        for a in ATTENTION:
            for n in (128, 256, 512):
                for p in ("forward", "forward_backward"):
                    rows.append(f"{a},{n},{p},{n * n / 1e4},{n * n * 16},ok,2")
        rows.append("dot_product,1024,forward,,,oom,2")
        (bench / "kernels.csv").write_text("\n".join(rows) + "\n")
        rows = ["attention_type,context_length,ms_per_token,cache_bytes"]
        for a in ATTENTION:
            for n in (64, 128, 256):
                rows.append(f"{a},{n},{0.1 + n / 1000},{n * 1024}")
        (bench / "decode.csv").write_text("\n".join(rows) + "\n")
        (out / "extras.json").write_text(json.dumps([{"name": "bench kernels", "status": "completed", "error": None, "log": "bench/kernels.log"},
                                                     {"name": "bench decode", "status": "unavailable", "error": "not installed", "log": None}]))


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    return read_csv(path)[1]


def test_results_tables(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, seeds=2)
    rows = report.write_results(out)
    assert len(rows) == 8
    table = read_csv_rows(out / "results.csv")
    assert list(table[0])[:3] == ["attention_type", "position_embedding", "seed"]
    for column in report.SUMMARY_COLUMNS:
        assert column in table[0]
    failed = [r for r in table if r["status"] == "failed"]
    assert [(r["attention_type"], r["position_embedding"], r["seed"]) for r in failed] == [("gqa", "alibi", "1")]
    assert "diverged" in failed[0]["error"]
    data = json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert data[0]["attention_type"] == "dot_product"
    assert [r["final_val_loss"] for r in data if (r["attention_type"], r["position_embedding"], r["seed"]) == ("gqa", "alibi", 1)] == [None]
    agg = {(r["attention_type"], r["position_embedding"]): r for r in read_csv_rows(out / "aggregate.csv")}
    cell = agg[("dot_product", "rope")]
    assert cell["completed"] == "2"
    assert float(cell["final_val_loss_mean"]) == pytest.approx(2.015)
    assert float(cell["final_val_loss_std"]) == pytest.approx(0.00707, rel=1e-2)
    assert agg[("gqa", "alibi")]["completed"] == "1" and agg[("gqa", "alibi")]["failed"] == "1"


def test_report_contents(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, seeds=2, preset="quick", extras=True)
    md_path, html_path = report.build_report(out)
    md, page = md_path.read_text(), html_path.read_text()
    assert "smoke" in md.lower() and "smoke" in page.lower()
    # the ranking: sorted by loss, mean ± std, best marked, units in the headers
    ranking = md.split("## Ranking by validation loss")[1].split("##")[0]
    lines = [line for line in ranking.splitlines() if line.startswith("| ")]
    assert "val loss (nats/token)" in lines[0] and "peak memory (MiB)" in lines[0] and "tokens/s" in lines[0]
    assert lines[1].startswith("| 1 | dot_product | rope | **2.0150 ± 0.0071**")
    assert "†" in ranking  # gqa has fewer parameters
    assert "Parameter counts differ" in md
    # failed run with its error
    assert "training diverged: loss is nan at step 7" in md
    # plots: files for the md, embedded base64 PNGs in the html, nothing external
    for name in ("val_loss", "throughput_memory", "attention_entropy", "entropy_over_training", "bench_kernels", "bench_decode", "extrapolation"):
        assert (out / "plots" / f"{name}.png").is_file(), name
        assert f"plots/{name}.png" in md
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 7 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<td class=\"best\">" in page
    assert "not installed" in md  # the extras' status
    assert "Length extrapolation" in md and "ppl @ 256" in md
    assert "not measured: 1 oom" in md


def test_report_command_rebuilds(tmp_path, capsys):
    out = tmp_path / "cmp"
    make_comparison(out)
    assert main(["report", str(out)]) == 0
    first = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "results.csv").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == first
    assert (out / "results.csv").is_file() and (out / "report.html").is_file()


def test_report_partial_and_pending(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, fail=False)
    for name in ("gqa-rope-seed1", "gqa-alibi-seed1"):
        for path in (out / "runs" / name).iterdir():
            path.unlink()
    md_path, _ = report.build_report(out)
    md = md_path.read_text()
    assert "2 completed, 2 pending" in md
    assert "not run yet" in md


def test_report_of_a_directory_without_comparison(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comparison.json" in err[0]
