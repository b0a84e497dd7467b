"""Results tables and the report of a comparison directory (written by `tcompare compare`).

    tcompare report DIR        # rebuild DIR/results.*, DIR/aggregate.csv, DIR/report.md and report.html

Everything is read from the saved files: DIR/comparison.json (the grid), and per run
DIR/runs/<name>/summary.json, metrics.jsonl, cell.json (what compare recorded about the process)
and extrapolation.csv, plus DIR/bench/kernels.csv and decode.csv and DIR/extras.json when present.
Plots are PNGs in DIR/plots/, embedded as base64 in report.html (one self-contained file).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from transformer_comparison.errors import UserError

KEY_COLUMNS = ["attention_type", "position_embedding", "seed"]
SUMMARY_COLUMNS = [
    "final_val_loss", "final_val_perplexity", "best_val_loss", "tokens_per_second", "step_time_ms",
    "peak_memory_bytes", "train_time_seconds", "num_parameters", "num_kv_heads", "mean_attention_entropy",
    "flops_per_token", "steps", "status", "error",
]
TAIL_COLUMNS = ["wall_seconds", "attempts", "run"]
NOT_AGGREGATED = {"seed", "world_size", "attempts", "returncode"}
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="a `tcompare compare` output directory")


def run(args: argparse.Namespace) -> int:
    md_path, html_path = build_report(args.dir)
    print(f"report: {md_path} and {html_path}")
    return 0


# ----------------------------------------------------------------------------------------------
# files


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write via a temporary file and os.replace, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            records.append(record)
    return records


def read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(newline="") as handle:
            return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    except OSError:
        return []


def _number(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def load_comparison(out: Path) -> dict[str, Any]:
    comparison = read_json(out / "comparison.json")
    if not isinstance(comparison, dict) or "cells" not in comparison:
        raise UserError(f"{out} holds no readable comparison.json: not a `tcompare compare` output directory")
    return comparison


# ----------------------------------------------------------------------------------------------
# results: one row per run, and mean/std per cell


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def run_status(summary: dict[str, Any] | None, record: dict[str, Any] | None) -> tuple[str, str | None]:
    """completed | failed | interrupted | pending, and the error message."""
    if summary and summary.get("status") == "completed" and (not record or record.get("status") == "completed"):
        return "completed", None
    if record:
        return record.get("status", "failed"), record.get("error")
    if summary:
        status = summary.get("status")
        return ("interrupted" if status == "interrupted" else "failed"), summary.get("error") or f"run ended with status {status}"
    return "pending", None


def run_row(out: Path, cell: dict[str, Any]) -> dict[str, Any]:
    run_dir = out / "runs" / cell["name"]
    summary = read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    record = read_json(run_dir / "cell.json")
    record = record if isinstance(record, dict) else None
    row: dict[str, Any] = {key: cell[key] for key in KEY_COLUMNS}
    row.update({key: None for key in SUMMARY_COLUMNS})
    for key, value in (summary or {}).items():
        if key in KEY_COLUMNS:
            continue
        if key == "dataset" and isinstance(value, dict):
            row["dataset"] = value.get("name") or value.get("dataset")
        elif value is None or isinstance(value, (int, float, str, bool)):
            row[key] = value
    row["status"], row["error"] = run_status(summary, record)
    row["wall_seconds"] = (record or {}).get("total_wall_seconds")
    row["attempts"] = (record or {}).get("attempts")
    row["run"] = f"runs/{cell['name']}"
    return row


def collect_rows(out: Path, comparison: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    comparison = comparison or load_comparison(out)
    return [run_row(out, cell) for cell in comparison["cells"]]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The three keys, the documented metrics, any other scalars the runs reported, then compare's own."""
    fixed = KEY_COLUMNS + SUMMARY_COLUMNS
    extra = sorted({key for row in rows for key in row} - set(fixed) - set(TAIL_COLUMNS))
    return fixed + extra + TAIL_COLUMNS


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Numeric columns worth a mean and std (not keys, counters or labels)."""
    names = [c for c in columns(rows) if c not in KEY_COLUMNS and c not in NOT_AGGREGATED]
    return [c for c in names if any(is_number(row.get(c)) for row in rows)]


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["attention_type"], row["position_embedding"]), []).append(row)
    return groups


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    numbers = [float(v) for v in values if finite(v)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (sample, over completed seeds) of every metric per (attention_type, position_embedding)."""
    metrics = metric_columns(rows)
    result = []
    for (attention, position), group in group_rows(rows).items():
        done = [row for row in group if row["status"] == "completed"]
        entry: dict[str, Any] = {
            "attention_type": attention,
            "position_embedding": position,
            "seeds": len(group),
            "completed": len(done),
            "failed": sum(row["status"] == "failed" for row in group),
        }
        for metric in metrics:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_std(row.get(metric) for row in done)
        result.append(entry)
    return result


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def csv_text(rows: list[dict[str, Any]], names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in names})
    return buffer.getvalue()


def write_results(out: Path) -> list[dict[str, Any]]:
    """Rewrite results.csv, results.json and aggregate.csv from the run directories; returns the rows."""
    rows = collect_rows(out)
    names = columns(rows)
    write_atomic(out / "results.csv", csv_text(rows, names))
    safe = [{key: _json_safe(row.get(key)) for key in names} for row in rows]
    write_atomic(out / "results.json", json.dumps(safe, indent=2) + "\n")
    groups = aggregate(rows)
    write_atomic(out / "aggregate.csv", csv_text(groups, list(groups[0]) if groups else ["attention_type", "position_embedding"]))
    return rows


# ----------------------------------------------------------------------------------------------
# the report's building blocks, rendered both as Markdown and as HTML


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # `code` spans allowed
    note: bool = False


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to mark


@dataclass
class Image:
    filename: str  # under DIR/plots/
    caption: str
    png: bytes


@dataclass
class Code:
    text: str
    language: str = ""


Block = Heading | Para | Table | Image | Code


def _md_inline(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [("> " if block.note else "") + block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_inline(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            for r, row in enumerate(block.rows):
                cells = [f"**{_md_inline(v)}**" if (r, c) in block.best and v else _md_inline(v) for c, v in enumerate(row)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        elif isinstance(block, Image):
            lines += [f"![{block.caption}](plots/{block.filename})", "", f"*{block.caption}*", ""]
        elif isinstance(block, Code):
            lines += [f"```{block.language}", block.text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _html_inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1280px;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #d0d0d0; padding: .3em .6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:nth-child(-n+3) { text-align: left; }
td.best { font-weight: 700; background: #dff3e3; }
td.wrap { white-space: normal; text-align: left; max-width: 60em; }
.note { background: #fff6d5; border-left: 4px solid #e0b000; padding: .6em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def render_html(title: str, blocks: list[Block]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>",
             f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            parts.append(f"<p class=\"note\">{_html_inline(block.text)}</p>" if block.note else f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            body = []
            for r, row in enumerate(block.rows):
                cells = []
                for c, value in enumerate(row):
                    classes = []
                    if (r, c) in block.best and value:
                        classes.append("best")
                    if len(value) > 60:
                        classes.append("wrap")
                    attr = f" class=\"{' '.join(classes)}\"" if classes else ""
                    cells.append(f"<td{attr}>{html.escape(value)}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            parts.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(block.caption)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        elif isinstance(block, Code):
            parts.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# number formatting


def fmt(value: Any, spec: str = ".4f", scale: float = 1.0) -> str:
    if not finite(value):
        return "—" if value is None else str(value)
    return format(value / scale, spec)


def fmt_mean_std(mean: Any, std: Any, spec: str, scale: float = 1.0) -> str:
    text = fmt(mean, spec, scale)
    return f"{text} ± {fmt(std, spec, scale)}" if finite(mean) and finite(std) else text


# ----------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_block(fig: Any, out: Path, filename: str, caption: str) -> Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    png = buffer.getvalue()
    write_atomic(out / "plots" / filename, png)
    return Image(filename, caption, png)


LINESTYLES = ["-", "--", ":", "-."]


class Styles:
    """Colour per attention type, line style per position encoding, in grid order."""

    def __init__(self, attention_types: list[str], position_embeddings: list[str]) -> None:
        import matplotlib

        colours = matplotlib.colormaps["tab10"].colors
        self.colour = {name: colours[i % len(colours)] for i, name in enumerate(attention_types)}
        self.style = {name: LINESTYLES[i % len(LINESTYLES)] for i, name in enumerate(position_embeddings)}

    def legend(self, ax: Any) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, lw=2, label=n) for n, c in self.colour.items()]
        handles += [Line2D([], [], color="black", ls=s, label=n) for n, s in self.style.items()]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


@dataclass
class RunData:
    row: dict[str, Any]
    summary: dict[str, Any]
    evals: list[dict[str, Any]]  # metrics.jsonl records with val_loss

    @property
    def key(self) -> tuple[str, str]:
        return self.row["attention_type"], self.row["position_embedding"]


def load_runs(out: Path, rows: list[dict[str, Any]]) -> list[RunData]:
    runs = []
    for row in rows:
        if row["status"] != "completed":
            continue
        run_dir = out / row["run"]
        summary = read_json(run_dir / "summary.json") or {}
        evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if finite(r.get("val_loss"))]
        runs.append(RunData(row, summary, evals))
    return runs


def plot_curves(runs: list[RunData], styles: Styles, out: Path, key: str, ylabel: str, filename: str, caption: str,
                by_time: bool = True) -> Image | None:
    drawn = [run for run in runs if any(key in r for r in run.evals)]
    if not drawn:
        return None
    plt = _pyplot()
    axes_count = 2 if by_time else 1
    fig, axes = plt.subplots(1, axes_count, figsize=(6.2 * axes_count, 4.2), squeeze=False)
    for run in drawn:
        points = [r for r in run.evals if key in r]
        values = [_curve_value(r[key]) for r in points]
        attention, position = run.key
        kw = {"color": styles.colour.get(attention), "ls": styles.style.get(position), "lw": 1.4, "alpha": 0.9}
        axes[0][0].plot([r["step"] for r in points], values, **kw)
        if by_time:
            axes[0][1].plot([r.get("elapsed_seconds", math.nan) for r in points], values, **kw)
    axes[0][0].set_xlabel("step")
    if by_time:
        axes[0][1].set_xlabel("training wall-clock time (s)")
    for ax in axes[0]:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _clip_start(axes[0], drawn, key)
    styles.legend(axes[0][-1])
    fig.tight_layout()
    return figure_block(fig, out, filename, caption)


def _curve_value(value: Any) -> float:
    if isinstance(value, list):  # attention_entropy: layers x heads -> the mean
        flat = [v for layer in value for v in (layer if isinstance(layer, list) else [layer]) if finite(v)]
        return statistics.fmean(flat) if flat else math.nan
    return float(value) if finite(value) else math.nan


def _clip_start(axes: Iterable[Any], runs: list[RunData], key: str) -> None:
    """Keep the first evaluation's high loss from flattening the rest of the curves."""
    if key != "val_loss":
        return
    finals = [run.evals[-1]["val_loss"] for run in runs if run.evals]
    starts = [run.evals[0]["val_loss"] for run in runs if run.evals]
    if finals and starts:
        low, high = min(finals), max(finals)
        top = min(max(starts), high + 3 * max(high - low, 0.05) + 0.5)
        if top <= low:  # a single evaluation per run: let matplotlib choose
            return
        for ax in axes:
            ax.set_ylim(bottom=low - 0.05 * (top - low), top=top)


def plot_bars(table: list[dict[str, Any]], attention_types: list[str], position_embeddings: list[str], out: Path) -> Image | None:
    by_key = {(e["attention_type"], e["position_embedding"]): e for e in table}
    panels = [("tokens_per_second", "training throughput (tokens/s)", 1.0), ("peak_memory_bytes", "peak memory of a training step (MiB)", MIB)]
    if not any(finite(e.get(f"{m}_mean")) for e in table for m, _, _ in panels):
        return None
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.6 * len(attention_types) * 2), 4.0))
    width = 0.8 / max(1, len(position_embeddings))
    x = np.arange(len(attention_types))
    colours = plt.get_cmap("Set2").colors
    for ax, (metric, label, scale) in zip(axes, panels):
        for j, position in enumerate(position_embeddings):
            means = [by_key.get((a, position), {}).get(f"{metric}_mean") for a in attention_types]
            stds = [by_key.get((a, position), {}).get(f"{metric}_std") for a in attention_types]
            heights = [m / scale if finite(m) else 0.0 for m in means]
            errors = [s / scale if finite(s) else 0.0 for s in stds]
            ax.bar(x + (j - (len(position_embeddings) - 1) / 2) * width, heights, width, yerr=errors if any(errors) else None,
                   label=position, color=colours[j % len(colours)], capsize=2)
        ax.set_xticks(x, attention_types, rotation=20)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="position", fontsize=8)
    fig.tight_layout()
    return figure_block(fig, out, "throughput_memory.png", "Training throughput and peak memory per cell (mean over seeds; error bars: std).")


def entropy_matrix(runs: list[RunData]) -> list[list[float]] | None:
    """attention_entropy (layers x heads) averaged over the runs (seeds) of one cell."""
    matrices = [run.summary.get("attention_entropy") for run in runs]
    matrices = [m for m in matrices if isinstance(m, list) and m and all(isinstance(layer, list) for layer in m)]
    if not matrices:
        return None
    shape = (len(matrices[0]), len(matrices[0][0]))
    same = [m for m in matrices if (len(m), len(m[0])) == shape]
    return [[statistics.fmean(m[i][j] for m in same) for j in range(shape[1])] for i in range(shape[0])]


def plot_entropy_heatmaps(runs: list[RunData], attention_types: list[str], position_embeddings: list[str], out: Path) -> Image | None:
    cells = {}
    for attention in attention_types:
        for position in position_embeddings:
            matrix = entropy_matrix([run for run in runs if run.key == (attention, position)])
            if matrix is not None:
                cells[(attention, position)] = matrix
    if not cells:
        return None
    plt = _pyplot()
    values = [v for m in cells.values() for layer in m for v in layer if finite(v)]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
    rows, cols = len(attention_types), len(position_embeddings)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 1.2, 1.9 * rows + 0.6), squeeze=False)
    image = None
    for i, attention in enumerate(attention_types):
        for j, position in enumerate(position_embeddings):
            ax = axes[i][j]
            matrix = cells.get((attention, position))
            if matrix is None:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(matrix[0])))
                ax.set_yticks(range(len(matrix)))
                ax.tick_params(labelsize=7)
                if len(matrix) * len(matrix[0]) <= 32:
                    for li, layer in enumerate(matrix):
                        for hj, value in enumerate(layer):
                            ax.text(hj, li, f"{value:.2f}", ha="center", va="center", fontsize=6,
                                    color="white" if value < (vmin + vmax) / 2 else "black")
            if i == 0:
                ax.set_title(position, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{attention}\nlayer", fontsize=8)
            if i == rows - 1:
                ax.set_xlabel("head", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="entropy (nats)")
    return figure_block(fig, out, "attention_entropy.png",
                        "Attention entropy per layer (rows) and head (columns) at the end of training, mean over queries of a fixed "
                        "validation probe (and over seeds). Low: focused attention; high: spread out (log of the context length is the maximum).")


def _plain_log_ticks(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())


def _first(names: Iterable[str], candidates: Iterable[str]) -> str | None:
    names = list(names)
    return next((c for c in candidates if c in names), None)


def plot_loglog(rows: list[dict[str, Any]], x_key: str, panels: list[tuple[str, str, float]], line_key: str | None,
                facet_key: str | None, out: Path, filename: str, caption: str) -> Image | None:
    """Log-log lines of each y column against x_key: one column of panels per y column, one row of
    panels per value of facet_key (e.g. the pass), one line per value of line_key (e.g. the mechanism)."""
    panels = [p for p in panels if any(finite(r.get(p[0])) and r[p[0]] > 0 for r in rows)]
    if not panels:
        return None
    facets = list(dict.fromkeys(r.get(facet_key) for r in rows)) if facet_key else [None]
    lines = list(dict.fromkeys(r.get(line_key) for r in rows)) if line_key else [None]
    plt = _pyplot()
    fig, axes = plt.subplots(len(facets), len(panels), figsize=(5.6 * len(panels), 3.8 * len(facets)), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for i, facet in enumerate(facets):
        for j, (y_key, label, scale) in enumerate(panels):
            ax = axes[i][j]
            for k, line in enumerate(lines):
                points = sorted((r[x_key], r[y_key] / scale) for r in rows
                                if r.get(facet_key) == facet and r.get(line_key) == line
                                and finite(r.get(x_key)) and finite(r.get(y_key)) and r[y_key] > 0)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1.3,
                            color=colours[k % len(colours)], label=str(line))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_xlabel(x_key.replace("_", " "))
            ax.set_ylabel(label)
            if facet is not None:
                ax.set_title(f"{facet_key}: {facet}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return figure_block(fig, out, filename, caption)


def _ok_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") in (None, "", "ok")]


def _bench_note(rows: list[dict[str, Any]], name: str) -> Para:
    failed = Counter(str(r.get("status")) for r in rows if r.get("status") not in (None, "", "ok"))
    text = f"From `bench/{name}` ({len(rows)} cases"
    text += "; not measured: " + ", ".join(f"{n} {status}" for status, n in failed.items()) if failed else ""
    return Para(text + ").")


def plot_kernels(out: Path) -> list[Block]:
    """bench/kernels.csv (tcompare bench kernels): mechanism, seq_len, pass, time_ms, peak_memory_bytes, status."""
    rows = read_csv(out / "bench" / "kernels.csv")
    if not rows:
        return []
    names = list(rows[0])
    x_key = _first(names, ("seq_len", "sequence_length", "length"))
    panels = [(c, label, scale) for c, label, scale in (("time_ms", "median time (ms)", 1.0), ("peak_memory_bytes", "peak memory (MiB)", MIB))
              if c in names]
    image = plot_loglog(_ok_rows(rows), x_key, panels, _first(names, ("mechanism", "attention_type", "kernel")),
                        _first(names, ("pass",)), out, "bench_kernels.png",
                        "Attention kernel time and peak memory against sequence length (log-log), one line per mechanism.") if x_key else None
    return [Heading("Kernel benchmark"), _bench_note(rows, "kernels.csv")] + ([image] if image else _existing_pngs(out, "kernels"))


def plot_decode(out: Path) -> list[Block]:
    """bench/decode.csv (tcompare bench decode): time per generated token and cache size against context."""
    rows = read_csv(out / "bench" / "decode.csv")
    if not rows:
        return []
    names = list(rows[0])
    x_key = _first(names, ("context_length", "context", "position", "seq_len", "length", "tokens"))
    time_key = _first(names, ("ms_per_token", "time_per_token_ms", "latency_ms", "time_ms"))
    cache_key = _first(names, ("cache_bytes", "kv_cache_bytes", "state_bytes", "cache_memory_bytes"))
    panels = ([(time_key, "time per token (ms)", 1.0)] if time_key else []) + ([(cache_key, "cache (MiB)", MIB)] if cache_key else [])
    facet = _first(names, ("mode", "cache_mode", "pass"))
    image = plot_loglog(_ok_rows(rows), x_key, panels, _first(names, ("mechanism", "attention_type", "run", "name")),
                        facet if facet and len({r.get(facet) for r in rows}) > 1 else None, out, "bench_decode.png",
                        "Decoding: time per generated token and key/value cache (or state) size against context (log-log).") if x_key else None
    return [Heading("Decoding benchmark"), _bench_note(rows, "decode.csv")] + ([image] if image else _existing_pngs(out, "decode"))


def _existing_pngs(out: Path, word: str) -> list[Block]:
    """The benchmark's own plots, when its CSV lacks the columns this report plots."""
    return [Image(f"../bench/{path.name}", f"bench/{path.name}", path.read_bytes())
            for path in sorted((out / "bench").glob(f"*{word}*.png"))]


def extrapolation_data(out: Path, rows: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], dict[int, list[float]]], set[int]]:
    """Per cell, evaluation length -> perplexities (one per seed), from non-overlapping windows when present."""
    data: dict[tuple[str, str], dict[int, list[float]]] = {}
    contexts: set[int] = set()
    for row in rows:
        if row["status"] != "completed":
            continue
        records = [r for r in read_csv(out / row["run"] / "extrapolation.csv") if finite(r.get("eval_length")) and finite(r.get("val_perplexity"))]
        plain = [r for r in records if r.get("stride") in (None, "", r["eval_length"])]
        for record in plain or records:
            key = (row["attention_type"], row["position_embedding"])
            data.setdefault(key, {}).setdefault(int(record["eval_length"]), []).append(float(record["val_perplexity"]))
            if finite(record.get("train_context_length")):
                contexts.add(int(record["train_context_length"]))
    return data, contexts


def plot_extrapolation(out: Path, rows: list[dict[str, Any]], styles: Styles, position_embeddings: list[str]) -> list[Block]:
    data, contexts = extrapolation_data(out, rows)
    if not data:
        return []
    plt = _pyplot()
    positions = [p for p in position_embeddings if any(k[1] == p for k in data)]
    fig, axes = plt.subplots(1, len(positions), figsize=(4.6 * len(positions), 4.0), squeeze=False, sharey=True)
    for ax, position in zip(axes[0], positions):
        for (attention, pos), by_length in data.items():
            if pos == position:
                lengths = sorted(by_length)
                ax.plot(lengths, [statistics.fmean(by_length[n]) for n in lengths], marker="o", ms=3,
                        color=styles.colour.get(attention), label=attention)
        for context in contexts:
            ax.axvline(context, color="grey", ls=":", lw=1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(position)
        ax.set_xlabel("evaluation length (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("validation perplexity")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    image = figure_block(fig, out, "extrapolation.png",
                         "Length extrapolation: validation perplexity against evaluation length, one panel per position encoding; "
                         "the dotted line is the training context, beyond it the model extrapolates.")
    lengths = sorted({n for by_length in data.values() for n in by_length})
    table_rows = [[a, p, *[fmt(statistics.fmean(d[n]), ".2f") if n in d else "—" for n in lengths]] for (a, p), d in data.items()]
    return [Heading("Length extrapolation"), image, Table(["attention", "position", *[f"ppl @ {n}" for n in lengths]], table_rows)]


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class Column:
    header: str
    metric: str
    spec: str
    scale: float = 1.0
    better: Callable[[list[float]], float] | None = min


RANKING_COLUMNS = [
    Column("val loss (nats/token)", "final_val_loss", ".4f"),
    Column("val perplexity", "final_val_perplexity", ".2f"),
    Column("best val loss (nats/token)", "best_val_loss", ".4f"),
    Column("tokens/s", "tokens_per_second", ",.0f", better=max),
    Column("step time (ms)", "step_time_ms", ".1f"),
    Column("peak memory (MiB)", "peak_memory_bytes", ".2f", MIB),
    Column("train time (s)", "train_time_seconds", ".1f"),
    Column("parameters", "num_parameters", ",.0f", better=None),
    Column("mean attention entropy (nats)", "mean_attention_entropy", ".3f", better=None),
]


def parameter_note(table: list[dict[str, Any]]) -> tuple[int | None, set[tuple[str, str]], str | None]:
    """The most common parameter count, the cells that differ from it, and a sentence about them."""
    counts = {(e["attention_type"], e["position_embedding"]): e.get("num_parameters_mean") for e in table if finite(e.get("num_parameters_mean"))}
    if not counts:
        return None, set(), None
    tally = Counter(counts.values())
    mode = max(tally, key=lambda value: (tally[value], value))  # the most common count; a tie: the larger
    differ = {key for key, value in counts.items() if value != mode}
    if not differ:
        return int(mode), differ, f"Every cell has the same number of parameters ({int(mode):,})."
    parts = []
    for label, keys in _by_attention(differ, counts):
        value = counts[keys[0]]
        kv = next((e.get("num_kv_heads_mean") for e in table if (e["attention_type"], e["position_embedding"]) == keys[0]), None)
        kv_text = f", {int(kv)} key/value heads" if finite(kv) else ""
        parts.append(f"{label}: {int(value):,} ({100 * (value - mode) / mode:+.1f}%{kv_text})")
    return int(mode), differ, (f"Parameter counts differ (marked †): most cells have {int(mode):,}; " + "; ".join(parts) +
                               ". Compare their losses with that in mind.")


def _by_attention(differ: set[tuple[str, str]], counts: dict[tuple[str, str], Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Name a mechanism once when all its cells differ alike (gqa: ...), else each cell (gqa x rope: ...)."""
    groups = []
    for attention in dict.fromkeys(a for a, _ in sorted(differ)):
        mine = [key for key in counts if key[0] == attention]
        if all(key in differ for key in mine) and len({counts[key] for key in mine}) == 1:
            groups.append((f"{attention} (every encoding)" if len(mine) > 1 else attention, mine))
        else:
            groups += [(f"{a} x {p}", [(a, p)]) for a, p in sorted(differ) if a == attention]
    return groups


def ranking_table(table: list[dict[str, Any]], seeds: int) -> tuple[Table, str | None]:
    ranked = sorted((e for e in table if e["completed"]), key=lambda e: (e.get("final_val_loss_mean") if finite(e.get("final_val_loss_mean")) else math.inf))
    _, differ, note = parameter_note(ranked)
    headers = ["#", "attention", "position", *[c.header for c in RANKING_COLUMNS]]
    if seeds > 1:
        headers.append("seeds")
    rows, best = [], set()
    for c_index, column in enumerate(RANKING_COLUMNS):
        values = [e.get(f"{column.metric}_mean") for e in ranked]
        good = [v for v in values if finite(v)]
        if column.better and len(set(good)) > 1:  # nothing to mark when every cell has the same value
            target = column.better(good)
            best |= {(r, c_index + 3) for r, v in enumerate(values) if finite(v) and v == target}
    for rank, entry in enumerate(ranked, 1):
        row = [str(rank), entry["attention_type"], entry["position_embedding"]]
        for column in RANKING_COLUMNS:
            mean, std = entry.get(f"{column.metric}_mean"), entry.get(f"{column.metric}_std")
            text = fmt_mean_std(mean, std if seeds > 1 and column.better else None, column.spec, column.scale)
            if column.metric == "num_parameters" and (entry["attention_type"], entry["position_embedding"]) in differ:
                text += " †"
            row.append(text)
        if seeds > 1:
            row.append(f"{entry['completed']}/{entry['seeds']}")
        rows.append(row)
    return Table(headers, rows, best), note


def problem_table(rows: list[dict[str, Any]]) -> Table | None:
    bad = [row for row in rows if row["status"] not in ("completed",)]
    if not bad:
        return None
    return Table(["attention", "position", "seed", "status", "error", "log"],
                 [[r["attention_type"], r["position_embedding"], str(r["seed"]), r["status"],
                   r.get("error") or ("not run yet" if r["status"] == "pending" else ""), f"{r['run']}/train.log"] for r in bad])


def budget_text(config: dict[str, Any]) -> str:
    training = config.get("training", {})
    model = config.get("model", {})
    if training.get("time_budget_seconds"):
        budget = f"{training['time_budget_seconds']:g} s of training wall-clock time per run"
        budget += f" (at most {training['max_steps']} steps)" if training.get("max_steps") else ""
    elif training.get("max_steps"):
        budget = f"{training['max_steps']} optimizer steps per run"
    else:
        budget = f"{training.get('num_epochs')} epochs per run"
    tokens = (training.get("batch_size") or 0) * (training.get("gradient_accumulation_steps") or 1) * (model.get("context_length") or 0)
    return (f"{budget}, {tokens:,} tokens per step; model: {model.get('num_layers')} layers, {model.get('num_heads')} heads, "
            f"d_model {model.get('d_model')}, context {model.get('context_length')}")


def overview(comparison: dict[str, Any], rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> list[Block]:
    grid = comparison.get("grid", {})
    counts = Counter(row["status"] for row in rows)
    blocks: list[Block] = []
    if comparison.get("note"):
        blocks.append(Para(comparison["note"], note=True))
    elif comparison.get("scale") == "smoke":
        blocks.append(Para("Smoke-scale comparison: the ranking is indicative only.", note=True))
    attention, position = grid.get("attention_types", []), grid.get("position_embeddings", [])
    text = (f"{len(attention)} attention mechanisms x {len(position)} positional encodings x {grid.get('seeds', 1)} seed(s) = "
            f"{len(rows)} runs: {counts.get('completed', 0)} completed")
    for status in ("failed", "interrupted", "pending"):
        if counts.get(status):
            text += f", {counts[status]} {status}"
    text += ". Budget: " + budget_text(comparison.get("config", {})) + "."
    if int(comparison.get("jobs") or 1) > 1:
        text += (f" Timings were taken with {comparison['jobs']} runs at a time "
                 f"({comparison.get('threads_per_job', 'default')} CPU thread(s) each), so throughput is per run, not per machine.")
    blocks.append(Para(text))
    ranked = [e for e in table if finite(e.get("final_val_loss_mean"))]
    if ranked:
        best = min(ranked, key=lambda e: e["final_val_loss_mean"])
        fastest = max((e for e in ranked if finite(e.get("tokens_per_second_mean"))), key=lambda e: e["tokens_per_second_mean"], default=None)
        line = (f"Lowest validation loss: **{best['attention_type']} + {best['position_embedding']}** "
                f"({best['final_val_loss_mean']:.4f} nats/token, perplexity {best.get('final_val_perplexity_mean', math.nan):.2f}).")
        if fastest:
            line += f" Highest throughput: **{fastest['attention_type']} + {fastest['position_embedding']}** ({fastest['tokens_per_second_mean']:,.0f} tokens/s)."
        blocks.append(Para(line))
    return blocks


def environment_blocks(out: Path, comparison: dict[str, Any], runs: list[RunData]) -> list[Block]:
    summary = runs[0].summary if runs else {}
    env = comparison.get("environment", {})
    dataset = summary.get("dataset") if isinstance(summary.get("dataset"), dict) else {}
    config = comparison.get("config", {})
    items = [
        ("comparison", comparison.get("name")),
        ("command", comparison.get("command")),
        ("preset", comparison.get("preset") or "none"),
        ("created / updated", f"{comparison.get('created')} / {comparison.get('updated')}"),
        ("device", summary.get("device") or config.get("training", {}).get("device")),
        ("torch", summary.get("torch_version") or env.get("torch")),
        ("python / platform", f"{env.get('python')} / {env.get('platform')}, {env.get('cpu_count')} CPUs"),
        ("dataset", dataset.get("name") or dataset.get("dataset") or config.get("data", {}).get("dataset")),
        ("dataset fingerprint", json.dumps({k: v for k, v in dataset.items() if k not in ("name", "dataset")}) if dataset else "—"),
        ("tokenizer", config.get("data", {}).get("tokenizer")),
        ("peak memory method", summary.get("peak_memory_method") or "—"),
        ("config hash", comparison.get("config_hash")),
    ]
    blocks: list[Block] = [Heading("Environment and configuration"),
                           Table(["", "value"], [[k, str(v) if v is not None else "—"] for k, v in items])]
    config_path = out / "comparison_config.yaml"
    if config_path.is_file():
        blocks += [Para("The resolved config of every run (`comparison_config.yaml`; attention.type, position.type and "
                        "training.seed are set per run):"), Code(config_path.read_text(), "yaml")]
    return blocks


def extras_blocks(out: Path) -> list[Block]:
    extras = read_json(out / "extras.json")
    if not isinstance(extras, list) or not extras:
        return []
    rows = [[e.get("name", ""), e.get("status", ""), e.get("error") or e.get("note") or "", e.get("log") or ""] for e in extras]
    return [Heading("Benchmarks and evaluations"), Table(["step", "status", "error / note", "log"], rows)]


def report_blocks(out: Path, comparison: dict[str, Any], rows: list[dict[str, Any]]) -> list[Block]:
    grid = comparison.get("grid", {})
    attention_types = grid.get("attention_types") or sorted({r["attention_type"] for r in rows})
    position_embeddings = grid.get("position_embeddings") or sorted({r["position_embedding"] for r in rows})
    seeds = int(grid.get("seeds") or 1)
    table = aggregate(rows)
    runs = load_runs(out, rows)
    styles = Styles(attention_types, position_embeddings)
    ranking, parameter_sentence = ranking_table(table, seeds)

    blocks: list[Block] = overview(comparison, rows, table)
    blocks += [Heading("Ranking by validation loss")]
    if ranking.rows:
        legend = "Sorted by final validation loss; the best value of each column is in bold."
        if seeds > 1:
            legend += " Values are mean ± std (sample) over the completed seeds."
        blocks += [Para(legend), ranking]
        if parameter_sentence:
            blocks.append(Para(parameter_sentence))
    else:
        blocks.append(Para("No run has completed yet."))
    problems = problem_table(rows)
    if problems:
        blocks += [Heading("Runs that did not complete"), problems]

    plots = [
        plot_curves(runs, styles, out, "val_loss", "validation loss (nats/token)", "val_loss.png",
                    "Validation loss against training step (left) and training wall-clock time (right); colour: attention, line style: position."),
        plot_bars(table, attention_types, position_embeddings, out),
        plot_entropy_heatmaps(runs, attention_types, position_embeddings, out),
        plot_curves(runs, styles, out, "attention_entropy", "mean attention entropy (nats)", "entropy_over_training.png",
                    "Mean attention entropy (over layers, heads and queries) during training.", by_time=False),
    ]
    titles = ["Validation loss curves", "Throughput and memory", "Attention entropy", "Attention entropy over training"]
    for title, image in zip(titles, plots):
        if image is not None:
            blocks += [Heading(title), image]
    blocks += plot_kernels(out) + plot_decode(out) + plot_extrapolation(out, rows, styles, position_embeddings)
    blocks += extras_blocks(out)
    blocks += environment_blocks(out, comparison, runs)
    return blocks


def build_report(out: Path) -> tuple[Path, Path]:
    """Rewrite the results files, then report.md and report.html, from what DIR holds."""
    out = Path(out)
    comparison = load_comparison(out)
    write_results(out)
    rows = collect_rows(out, comparison)
    title = f"Attention x position comparison: {comparison.get('name', out.name)}"
    if comparison.get("scale") == "smoke":
        title += " (smoke scale)"
    blocks = report_blocks(out, comparison, rows)
    md_path, html_path = out / "report.md", out / "report.html"
    write_atomic(md_path, render_markdown(title, blocks))
    write_atomic(html_path, render_html(title, blocks))
    return md_path, html_path
