"""The report's plots, as PNGs in DIR/plots/: training curves, throughput and memory, attention entropy,
the learning-rate curves of a sweep, the scaling plot, length extrapolation and the benchmarks.

Every function takes what it draws and returns an `Image` (None when there is nothing to draw).
Colour is the mechanism, line style the encoding, in the grid's (registry) order. Matplotlib's
object API only (no pyplot state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from transformer_comparison.artifacts.comparison import ResultRow
from transformer_comparison.plots import Panel, loglog_figure, save_png
from transformer_comparison.report.render import Image
from transformer_comparison.report.tables import RunFiles

MIB = 2**20
LINESTYLES = ["-", "--", ":", "-."]


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(rows, cols, squeeze=False)


def image(fig: Any, out: Path, filename: str, caption: str) -> Image:
    return Image(filename, caption, save_png(fig, out / "plots" / filename))


class Styles:
    """Colour per attention type, line style per position encoding, in grid order."""

    def __init__(self, attention_types: list[str], position_embeddings: list[str]) -> None:
        import matplotlib

        colours = matplotlib.colormaps["tab10"].colors
        self.colour = {name: colours[i % len(colours)] for i, name in enumerate(attention_types)}
        self.style = {name: LINESTYLES[i % len(LINESTYLES)] for i, name in enumerate(position_embeddings)}

    def of(self, attention: str, position: str) -> dict[str, Any]:
        return {"color": self.colour.get(attention), "ls": self.style.get(position, "-")}

    def legend(self, ax: Any) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, lw=2, label=n) for n, c in self.colour.items()]
        handles += [Line2D([], [], color="black", ls=s, label=n) for n, s in self.style.items()]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


@dataclass
class Run:
    row: ResultRow
    files: RunFiles


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _entropy_mean(matrix: list[list[float]] | None) -> float:
    return _mean([v for layer in matrix for v in layer]) if matrix else math.nan


def loss_curves(runs: list[Run], styles: Styles, out: Path) -> Image | None:
    """Validation loss against step (sample efficiency) and against training wall-clock time."""
    drawn = [run for run in runs if run.files.evals]
    if not drawn:
        return None
    fig, axes = _figure(12.4, 4.2, 1, 2)
    for run in drawn:
        evals = run.files.evals
        kw = {**styles.of(run.row.attention_type, run.row.position_embedding), "lw": 1.4, "alpha": 0.9}
        axes[0][0].plot([r.step for r in evals], [r.val_loss for r in evals], **kw)
        axes[0][1].plot([r.elapsed_seconds for r in evals], [r.val_loss for r in evals], **kw)
    finals = [run.files.evals[-1].val_loss for run in drawn]
    starts = [run.files.evals[0].val_loss for run in drawn]
    low, high = min(finals), max(finals)
    top = min(max(starts), high + 3 * max(high - low, 0.05) + 0.5)  # keep the first evaluation from flattening the rest
    for ax, label in zip(axes[0], ("step", "training wall-clock time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        if top > low:
            ax.set_ylim(bottom=low - 0.05 * (top - low), top=top)
    styles.legend(axes[0][1])
    fig.tight_layout()
    return image(fig, out, "val_loss.png", "Validation loss against training step (left) and training wall-clock time "
                 "(right); colour: attention, line style: position.")


def entropy_curves(runs: list[Run], styles: Styles, out: Path) -> Image | None:
    drawn = [run for run in runs if any(r.attention_entropy for r in run.files.evals)]
    if not drawn:
        return None
    fig, axes = _figure(6.6, 4.2)
    for run in drawn:
        points = [(r.step, _entropy_mean(r.attention_entropy)) for r in run.files.evals if r.attention_entropy]
        axes[0][0].plot(*zip(*points), **styles.of(run.row.attention_type, run.row.position_embedding), lw=1.4)
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("mean attention entropy (nats)")
    axes[0][0].grid(alpha=0.3)
    styles.legend(axes[0][0])
    fig.tight_layout()
    return image(fig, out, "entropy_over_training.png", "Mean attention entropy (over layers, heads and queries) during "
                 "training; mechanisms without an attention distribution have none.")


def throughput_bars(cells: list[dict[str, Any]], attention_types: list[str], position_embeddings: list[str], out: Path) -> Image | None:
    """Bars per mechanism, one per encoding: tokens/s and peak memory (mean over seeds, std as error bars)."""
    panels = [("tokens_per_second", "training throughput (tokens/s)", 1.0), ("peak_memory_bytes", "peak memory of a training step (MiB)", MIB)]
    by_key = {(c["attention_type"], c["position_embedding"]): c for c in cells}
    if not any(_finite(c.get(f"{m}_mean")) for c in cells for m, _, _ in panels):
        return None
    import matplotlib

    fig, axes = _figure(max(9.0, 3.2 * len(attention_types)), 4.0, 1, 2)
    width = 0.8 / max(1, len(position_embeddings))
    colours = matplotlib.colormaps["Set2"].colors
    for ax, (metric, label, scale) in zip(axes[0], panels):
        for j, position in enumerate(position_embeddings):
            entries = [by_key.get((a, position), {}) for a in attention_types]
            heights = [e.get(f"{metric}_mean") / scale if _finite(e.get(f"{metric}_mean")) else 0.0 for e in entries]
            errors = [e.get(f"{metric}_std") / scale if _finite(e.get(f"{metric}_std")) else 0.0 for e in entries]
            offsets = [i + (j - (len(position_embeddings) - 1) / 2) * width for i in range(len(attention_types))]
            ax.bar(offsets, heights, width, yerr=errors if any(errors) else None, label=position,
                   color=colours[j % len(colours)], capsize=2)
        ax.set_xticks(range(len(attention_types)), attention_types, rotation=20)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(title="position", fontsize=8)
    fig.tight_layout()
    return image(fig, out, "throughput_memory.png", "Training throughput and peak memory per cell (mean over seeds; error bars: std).")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def entropy_heatmaps(matrices: dict[tuple[str, str], list[list[float]]], out: Path) -> Image | None:
    """Per layer and head, the entropy at the end of training; one row per mechanism that has one."""
    if not matrices:
        return None
    attention_types = list(dict.fromkeys(a for a, _ in matrices))
    position_embeddings = list(dict.fromkeys(p for _, p in matrices))
    values = [v for m in matrices.values() for layer in m for v in layer if math.isfinite(v)]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
    rows, cols = len(attention_types), len(position_embeddings)
    fig, axes = _figure(2.4 * cols + 1.2, 1.9 * rows + 0.6, rows, cols)
    shown = None
    for i, attention in enumerate(attention_types):
        for j, position in enumerate(position_embeddings):
            ax, matrix = axes[i][j], matrices.get((attention, position))
            if matrix is None:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                shown = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
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
    if shown is not None:
        fig.colorbar(shown, ax=axes, shrink=0.8, label="entropy (nats)")
    return image(fig, out, "attention_entropy.png",
                 "Attention entropy per layer (rows) and head (columns) at the end of training, mean over queries of a fixed "
                 "validation probe (and over seeds). Low: focused attention; high: spread out (log of the context length is "
                 "the maximum). Mechanisms without an attention distribution have no row.")


def learning_rate_curves(cells: list[dict[str, Any]], key: str, styles: Styles, attention_types: list[str], out: Path) -> Image | None:
    """One panel per mechanism: validation loss (mean over seeds, std as error bars) against the learning rate."""
    mechanisms = [a for a in attention_types if any(c["attention_type"] == a and _finite(c.get("final_val_loss_mean")) for c in cells)]
    if not mechanisms:
        return None
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    cols = min(3, len(mechanisms))
    rows = math.ceil(len(mechanisms) / cols)
    fig, axes = _figure(4.4 * cols + 1.4, 3.4 * rows, rows, cols)
    for index, ax in enumerate(ax for line in axes for ax in line):
        if index >= len(mechanisms):
            ax.set_visible(False)
            continue
        mechanism = mechanisms[index]
        for position in styles.style:
            points = sorted((c[key], c["final_val_loss_mean"], c.get("final_val_loss_std") or 0.0) for c in cells
                            if c["attention_type"] == mechanism and c["position_embedding"] == position
                            and _finite(c.get(key)) and _finite(c.get("final_val_loss_mean")))
            if points:
                xs, ys, errs = zip(*points)
                ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", ms=3.5, capsize=2, lw=1.3,
                            **styles.of(mechanism, position), label=position)
                best = min(points, key=lambda p: p[1])
                ax.plot([best[0]], [best[1]], marker="*", ms=11, color=styles.colour.get(mechanism), zorder=5)
        ax.set_xscale("log")
        rates = sorted({c[key] for c in cells if c["attention_type"] == mechanism and _finite(c.get(key))})
        ax.xaxis.set_major_locator(FixedLocator(rates))  # a tick at each swept rate, and no others
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_title(mechanism, fontsize=10)
        ax.set_xlabel(key.rsplit(".", 1)[-1].replace("_", " "))
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return image(fig, out, "learning_rate.png", "Validation loss against the learning rate, one panel per mechanism, one line "
                 "per encoding (mean over seeds, error bars: std); the star is the rate the ranking uses.")


def scaling_plot(points: list[dict[str, Any]], styles: Styles, out: Path) -> Image | None:
    """Validation loss against training FLOPs (log-log), one line per mechanism x encoding."""
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in points:
        if _finite(p.get("training_flops_mean")) and _finite(p.get("final_val_loss_mean")) and p["training_flops_mean"] > 0:
            lines.setdefault((p["attention_type"], p["position_embedding"]), []).append((p["training_flops_mean"], p["final_val_loss_mean"]))
    lines = {k: sorted(v) for k, v in lines.items() if len(v) > 1}
    if not lines:
        return None
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = _figure(7.4, 4.6)
    ax = axes[0][0]
    for (attention, position), line in lines.items():
        ax.plot(*zip(*line), marker="o", ms=4, lw=1.5, **styles.of(attention, position))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training FLOPs (forward + backward, model estimate)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    styles.legend(ax)
    fig.tight_layout()
    return image(fig, out, "scaling.png", "Scaling: validation loss against training compute, one line per mechanism x encoding "
                 "(one point per model size, at its best learning rate when one was swept). Lower and further left is better; "
                 "where lines cross, the cheaper mechanism stops paying.")


def extrapolation_plot(data: dict[tuple[str, str], dict[int, list[float]]], contexts: set[int], styles: Styles, out: Path) -> Image | None:
    """Perplexity against evaluation length, one panel per encoding, through the shared log-log helper."""
    rows = [{"attention": a, "position": p, "eval_length": n, "val_perplexity": _mean(values)}
            for (a, p), by_length in data.items() for n, values in by_length.items()]
    fig = loglog_figure(rows, "eval_length", [Panel("val_perplexity", "validation perplexity")], line="attention",
                        facet="position", xlabel="evaluation length (tokens)", vlines=contexts, colours=styles.colour)
    if fig is None:
        return None
    return image(fig, out, "extrapolation.png", "Length extrapolation: validation perplexity against evaluation length, one panel "
                 "per position encoding; the dotted line is the training context, beyond it the model extrapolates.")


def bench_plot(rows: list[dict[str, Any]], x: str, panels: list[Panel], line: str | None, facet: str | None,
               out: Path, filename: str, caption: str, xlabel: str) -> Image | None:
    fig = loglog_figure(rows, x, panels, line=line, facet=facet, xlabel=xlabel)
    return None if fig is None else image(fig, out, filename, caption)
