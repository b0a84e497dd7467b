"""The probe's plots, from the best learning rate of every cell (averaged over seeds), at the
training length:

- accuracy_vs_d_model.png: accuracy against d_model, one panel per (L, D), one line per mechanism
  (x encoding, when there are several);
- accuracy_vs_state_bytes.png: accuracy against the bytes per layer the mechanism keeps to decode
  the next token (log axis), one line per mechanism through its d_model values, one panel per (L, D):
  the papers' recall-against-state-size plot;
- accuracy_vs_test_length.png (with --test_seq_lens): accuracy at each test length, one panel per
  (training L, D), at the largest d_model.

Matplotlib's object API (no pyplot state, never a window); PNGs written atomically (plots.save_png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from transformer_comparison.plots import save_png
from transformer_comparison.probe.results import ProbeRow, best_cells

D_MODEL_PLOT = "accuracy_vs_d_model.png"
STATE_PLOT = "accuracy_vs_state_bytes.png"
LENGTH_PLOT = "accuracy_vs_test_length.png"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def line_label(attention_type: str, position_embedding: str, several_encodings: bool) -> str:
    return f"{attention_type}+{position_embedding}" if several_encodings else attention_type


def _styles(frame: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    """Colour per mechanism (tab10/tab20, in order of first appearance), line style per encoding."""
    import matplotlib

    mechanisms = list(dict.fromkeys(frame["attention_type"]))
    encodings = list(dict.fromkeys(frame["position_embedding"]))
    palette = matplotlib.colormaps["tab10" if len(mechanisms) <= 10 else "tab20"].colors
    return {(m, e): {"color": palette[i % len(palette)], "linestyle": LINESTYLES[j % len(LINESTYLES)],
                     "marker": MARKERS[j % len(MARKERS)]}
            for i, m in enumerate(mechanisms) for j, e in enumerate(encodings)}


def _panel_grid(settings: list[tuple[int, int]]):
    """A figure with one axis per (L, D): rows L, columns D (a single row when there is one L)."""
    from matplotlib.figure import Figure

    lengths = sorted({length for length, _ in settings})
    pairs = sorted({d for _, d in settings})
    fig = Figure(figsize=(4.2 * len(pairs) + 1.8, 3.3 * len(lengths)))
    axes = fig.subplots(len(lengths), len(pairs), squeeze=False)
    return fig, {(length, d): axes[i][j] for i, length in enumerate(lengths) for j, d in enumerate(pairs)}, axes


def _lines_figure(frame: pd.DataFrame, x: str, xlabel: str, log_x: bool) -> Any | None:
    """Accuracy against `x`, a panel per (seq_len, num_kv_pairs), a line per mechanism x encoding."""
    if frame.empty:
        return None
    styles = _styles(frame)
    several = frame["position_embedding"].nunique() > 1
    settings = sorted(set(zip(frame["seq_len"], frame["num_kv_pairs"])))
    fig, panels, axes = _panel_grid(settings)
    for (length, pairs), ax in panels.items():
        part = frame[(frame["seq_len"] == length) & (frame["num_kv_pairs"] == pairs)]
        for (mechanism, encoding), line in part.groupby(["attention_type", "position_embedding"], sort=False):
            line = line.sort_values(x)
            ax.plot(line[x], line["accuracy"], lw=1.4, ms=4, label=line_label(mechanism, encoding, several),
                    **styles[(mechanism, encoding)])
        ax.set_title(f"L = {length}, D = {pairs}", fontsize=10)
        ax.set_ylim(-0.02, 1.03)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MQAR accuracy")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        if part.empty:
            ax.set_visible(False)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    merged = dict(zip(labels, handles))
    for ax in panels.values():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            merged.setdefault(label, handle)
    fig.legend(list(merged.values()), list(merged.keys()), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.98),
               frameon=False)
    fig.tight_layout()
    return fig


def _ticks_at(fig: Any, values: list[int]) -> None:
    for ax in fig.axes:
        if ax.get_visible():
            ax.set_xticks(values, [str(v) for v in values])
            ax.minorticks_off()


def d_model_figure(frame: pd.DataFrame) -> Any | None:
    fig = _lines_figure(frame, "d_model", "d_model", log_x=True)
    if fig is not None:
        _ticks_at(fig, sorted(int(v) for v in frame["d_model"].unique()))
    return fig


def human_bytes(value: float, _position: Any = None) -> str:
    """2048 -> '2 KiB' (axis tick labels)."""
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def state_figure(frame: pd.DataFrame) -> Any | None:
    from matplotlib.ticker import FuncFormatter

    fig = _lines_figure(frame.dropna(subset=["state_bytes"]), "state_bytes", "decoding state per layer (log scale)",
                        log_x=True)
    for ax in [] if fig is None else fig.axes:
        ax.xaxis.set_major_formatter(FuncFormatter(human_bytes))
    return fig


def length_figure(summary: pd.DataFrame) -> Any | None:
    """Accuracy against test length at each cell's largest d_model (only when some test length exceeds L)."""
    if summary.empty or not (summary["test_seq_len"] > summary["seq_len"]).any():
        return None
    widest = summary[summary["d_model"] == summary.groupby(["seq_len", "num_kv_pairs"])["d_model"].transform("max")]
    fig = _lines_figure(widest, "test_seq_len", "test sequence length (trained at L)", log_x=True)
    if fig is not None:
        _ticks_at(fig, sorted(int(v) for v in widest["test_seq_len"].unique()))
    return fig


def write_plots(rows: list[ProbeRow], out_dir: Path) -> list[Path]:
    """Draw every plot the rows allow into out_dir; the paths written."""
    summary = best_cells(rows)
    if summary.empty:
        return []
    at_training_length = summary[summary["test_seq_len"] == summary["seq_len"]]
    written = []
    for name, fig in ((D_MODEL_PLOT, d_model_figure(at_training_length)), (STATE_PLOT, state_figure(at_training_length)),
                      (LENGTH_PLOT, length_figure(summary))):
        if fig is not None:
            save_png(fig, out_dir / name)
            written.append(out_dir / name)
    return written
