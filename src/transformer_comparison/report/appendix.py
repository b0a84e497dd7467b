"""The report's later sections: benchmarks (bench/kernels.csv, bench/decode.csv), length extrapolation
(runs/*/extrapolation.csv), the optional steps (extras.json) and the environment."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from transformer_comparison.artifacts.comparison import Comparison, ResultRow
from transformer_comparison.artifacts.io import write_bytes_atomic
from transformer_comparison.plots import Panel, number
from transformer_comparison.report.figures import MIB, Run, Styles, bench_plot, extrapolation_plot
from transformer_comparison.report.render import Block, Code, Heading, Image, Para, Table
from transformer_comparison.report.sections import fmt

OK = ("", "ok")


def read_rows(path: Path) -> list[dict[str, str]]:
    """A benchmark's CSV as text rows ([] when there is none); the plots read the numbers."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def _bench_note(rows: list[dict[str, str]], name: str) -> Para:
    failed = Counter(r.get("status") or "" for r in rows if (r.get("status") or "") not in OK)
    text = f"From `bench/{name}` ({len(rows)} cases"
    text += "; not measured: " + ", ".join(f"{n} {status}" for status, n in failed.items()) if failed else ""
    return Para(text + ").")


def _existing_pngs(out: Path, word: str) -> list[Block]:
    """The benchmark's own plots, when its CSV has no measured case to plot."""
    return [Image(f"../bench/{path.name}", f"bench/{path.name}", path.read_bytes()) for path in sorted((out / "bench").glob(f"*{word}*.png"))]


def kernels_section(out: Path) -> list[Block]:
    """bench/kernels.csv: mechanism, seq_len, pass, time_ms, peak_memory_bytes, status."""
    rows = read_rows(out / "bench" / "kernels.csv")
    if not rows:
        return []
    ok = [r for r in rows if (r.get("status") or "") in OK]
    image = bench_plot(ok, "seq_len", [Panel("time_ms", "median time (ms)"), Panel("peak_memory_bytes", "peak memory (MiB)", MIB)],
                       "mechanism", "pass", out, "bench_kernels.png",
                       "Attention kernel time and peak memory against sequence length (log-log), one line per mechanism.",
                       "sequence length n")
    return [Heading("Kernel benchmark"), _bench_note(rows, "kernels.csv")] + ([image] if image else _existing_pngs(out, "kernels"))


def decode_section(out: Path) -> list[Block]:
    """bench/decode.csv: mechanism, position_embedding, context_length, ms_per_token, cache_bytes, status."""
    rows = read_rows(out / "bench" / "decode.csv")
    if not rows:
        return []
    ok = [r for r in rows if (r.get("status") or "") in OK]
    image = bench_plot(ok, "context_length", [Panel("ms_per_token", "time per token (ms)"), Panel("cache_bytes", "cache (MiB)", MIB)],
                       "mechanism", None, out, "bench_decode.png",
                       "Decoding: time per generated token and key/value cache (or state) size against context (log-log).",
                       "context length (tokens in the cache)")
    return [Heading("Decoding benchmark"), _bench_note(rows, "decode.csv")] + ([image] if image else _existing_pngs(out, "decode"))


def extrapolation_data(out: Path, rows: list[ResultRow]) -> tuple[dict[tuple[str, str], dict[int, list[float]]], set[int]]:
    """Per cell, evaluation length -> perplexities (one per seed), from non-overlapping windows when present."""
    data: dict[tuple[str, str], dict[int, list[float]]] = {}
    contexts: set[int] = set()
    for row in rows:
        if row.status != "completed":
            continue
        records = [r for r in read_rows(out / row.run / "extrapolation.csv") if number(r.get("eval_length")) > 0
                   and number(r.get("val_perplexity")) > 0]
        plain = [r for r in records if (r.get("stride") or r["eval_length"]) == r["eval_length"]]
        for record in plain or records:
            length = int(number(record["eval_length"]))
            data.setdefault((row.attention_type, row.position_embedding), {}).setdefault(length, []).append(number(record["val_perplexity"]))
            if number(record.get("train_context_length")) > 0:
                contexts.add(int(number(record["train_context_length"])))
    return data, contexts


def extrapolation_section(out: Path, rows: list[ResultRow], styles: Styles) -> list[Block]:
    data, contexts = extrapolation_data(out, rows)
    if not data:
        return []
    image = extrapolation_plot(data, contexts, styles, out)
    lengths = sorted({n for by_length in data.values() for n in by_length})
    table = [[a, p, *[fmt(sum(d[n]) / len(d[n]), ".2f") if n in d else "—" for n in lengths]] for (a, p), d in data.items()]
    return [Heading("Length extrapolation"), *([image] if image else []), Table(["attention", "position", *[f"ppl @ {n}" for n in lengths]], table)]


def probe_section(out: Path) -> list[Block]:
    """The recall probe's section (DIR/probe/mqar/mqar.csv, from `tcompare compare --probe mqar`)."""
    csv_path = out / "probe" / "mqar" / "mqar.csv"
    if not csv_path.is_file():
        return []
    try:
        from transformer_comparison.probe import report_section
    except ImportError:
        return []
    blocks = report_section(csv_path).blocks()
    for block in blocks:
        if isinstance(block, Image):  # beside report.md, as the other plots
            write_bytes_atomic(out / "plots" / block.filename, lambda stream, png=block.png: stream.write(png))
    return blocks


def extras_section(out: Path) -> list[Block]:
    try:
        extras = json.loads((out / "extras.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(extras, list) or not extras:
        return []
    rows = [[e.get("name", ""), e.get("status", ""), e.get("error") or e.get("note") or "", e.get("log") or ""] for e in extras]
    return [Heading("Benchmarks and evaluations"), Table(["step", "status", "error / note", "log"], rows)]


def environment_section(out: Path, comparison: Comparison, runs: list[Run]) -> list[Block]:
    summary = next((run.files.summary for run in runs if run.files.summary is not None), None)
    env, config = comparison.environment, comparison.config
    dataset: dict[str, Any] = summary.dataset.model_dump() if summary else {}
    items = [
        ("comparison", comparison.name),
        ("command", comparison.command),
        ("preset", comparison.preset or "none"),
        ("executor", f"{comparison.executor}" + (f" (ray {env.ray})" if env.ray else "")),
        ("created / updated", f"{comparison.created} / {comparison.updated}"),
        ("device", summary.device if summary else config.get("training", {}).get("device")),
        ("torch", summary.torch_version if summary else env.torch),
        ("python / platform", f"{env.python} / {env.platform}, {env.cpu_count} CPUs"),
        ("dataset", dataset.get("dataset") or config.get("data", {}).get("dataset")),
        ("dataset fingerprint", json.dumps({k: v for k, v in dataset.items() if k != "dataset"}) if dataset else "—"),
        ("tokenizer", config.get("data", {}).get("tokenizer")),
        ("peak memory method", summary.peak_memory_method if summary else "—"),
        ("config hash", comparison.config_hash),
    ]
    blocks: list[Block] = [Heading("Environment and configuration"),
                           Table(["", "value"], [[k, str(v) if v is not None else "—"] for k, v in items])]
    config_path = out / "comparison_config.yaml"
    if config_path.is_file():
        blocks += [Para("The resolved config every run starts from (`comparison_config.yaml`; attention.type, position.type, "
                        "training.seed and the swept keys are set per run):"), Code(config_path.read_text(), "yaml")]
    return blocks
