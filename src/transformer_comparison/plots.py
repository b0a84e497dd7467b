"""One log-log plot of measurements against a length, for every command that draws one.

    fig = loglog_figure(rows, "seq_len", [Panel("time_ms", "median time (ms)")], line="mechanism", facet="pass")
    png = save_png(fig, out / "kernels_time.png")          # also returns the PNG's bytes

`rows` are plain mappings (CSV rows, model dumps); numbers may be strings as a CSV reader gives
them. One panel per (facet value, panel) pair, facets in rows, panels in columns; one line per value
of `line`, in the order of first appearance. Points that are missing, not finite or not positive
are left out. The x axis is log2 with a tick at every measured length, the y axis log (or, with
log_y=None, log only when the values span more than a factor of 5). Matplotlib's object API only
(no pyplot state), so it is safe in any thread and never opens a window.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WIDE_RANGE = 5.0  # log_y=None: a log y axis when max / min exceeds this


@dataclass(frozen=True)
class Panel:
    y: str  # the column plotted
    label: str  # its axis label, with the unit
    scale: float = 1.0  # values are divided by this (bytes -> MiB: 2**20)


def number(value: Any) -> float:
    """A finite float from a number or numeric text; nan otherwise."""
    if isinstance(value, bool):
        return math.nan
    try:
        result = float(value)
    except (TypeError, ValueError):
        return math.nan
    return result if math.isfinite(result) else math.nan


def _points(rows: Sequence[Mapping[str, Any]], x: str, panel: Panel, line_key: str | None, line: Any,
            facet_key: str | None, facet: Any) -> list[tuple[float, float]]:
    points = []
    for row in rows:
        if (line_key and row.get(line_key) != line) or (facet_key and row.get(facet_key) != facet):
            continue
        px, py = number(row.get(x)), number(row.get(panel.y))
        if px > 0 and py > 0:
            points.append((px, py / panel.scale))
    return sorted(points)


def loglog_figure(rows: Sequence[Mapping[str, Any]], x: str, panels: Sequence[Panel], *, line: str | None = None,
                  facet: str | None = None, xlabel: str | None = None, title: str | None = None,
                  dashed: Collection[Any] = (), vlines: Collection[float] = (), vline_label: str = "training context",
                  log_y: bool | None = True, colours: Mapping[Any, Any] | None = None) -> Any | None:
    """The figure (matplotlib.figure.Figure), or None when no panel has a point to plot."""
    from matplotlib.figure import Figure

    drawn = [p for p in panels if any(_points(rows, x, p, None, None, None, None))]
    if not drawn:
        return None
    facets = list(dict.fromkeys(row.get(facet) for row in rows)) if facet else [None]
    lines = list(dict.fromkeys(row.get(line) for row in rows)) if line else [None]
    fig = Figure(figsize=(5.6 * len(drawn), 3.9 * len(facets)))
    axes = fig.subplots(len(facets), len(drawn), squeeze=False)
    palette = _palette()
    for i, facet_value in enumerate(facets):
        for j, panel in enumerate(drawn):
            ax = axes[i][j]
            values, lengths = [], set()
            for k, line_value in enumerate(lines):
                points = _points(rows, x, panel, line, line_value, facet, facet_value)
                if not points:
                    continue
                colour = (colours or {}).get(line_value, palette[k % len(palette)])
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3.5, lw=1.4, color=colour,
                        linestyle="--" if line_value in dashed else "-", label=str(line_value) if line else None)
                values += [p[1] for p in points]
                lengths |= {p[0] for p in points}
            for k, position in enumerate(sorted(vlines)):
                ax.axvline(position, color="grey", linestyle=":", linewidth=1.2, label=vline_label if k == 0 else None)
            _format_axes(ax, sorted(lengths | set(vlines)), values, log_y)
            ax.set_xlabel(xlabel or x.replace("_", " "))
            ax.set_ylabel(panel.label)
            heading = f"{facet}: {facet_value}" if facet else title
            if heading:
                ax.set_title(heading, fontsize=10)
            if i == 0 and j == len(drawn) - 1 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _palette() -> list[Any]:
    import matplotlib

    return list(matplotlib.colormaps["tab10"].colors)


def _format_axes(ax: Any, ticks: list[float], values: list[float], log_y: bool | None) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    wide = bool(values) and max(values) / min(values) > WIDE_RANGE
    if log_y or (log_y is None and wide):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")


def save_png(fig: Any, path: str | os.PathLike[str] | None = None, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, written atomically to `path` when one is given."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    png = buffer.getvalue()
    if path is not None:
        from transformer_comparison.artifacts.io import write_bytes_atomic

        write_bytes_atomic(path, lambda stream: stream.write(png))
    return png
