"""Results tables and the report of a comparison directory (written by `tcompare compare`).

    tcompare report DIR        # rebuild DIR/results.*, DIR/aggregate.csv, DIR/report.md and report.html

Everything is read from the saved files: DIR/comparison.json (the grid, each cell's accounting),
and per run DIR/runs/<name>/summary.json, metrics.jsonl, cell.json and extrapolation.csv, plus
DIR/bench/kernels.csv and decode.csv and DIR/extras.json when present. Plots are PNGs in
DIR/plots/, embedded as base64 in report.html (one self-contained file).

Modules: tables (results.csv, aggregate.csv; pandas), statistics (intervals and groups; scipy),
sections (the ranking and the text), figures (the plots), appendix (benchmarks, extrapolation,
environment), render (Markdown and HTML through the Jinja2 templates in templates/).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformer_comparison.artifacts.io import write_text_atomic
from transformer_comparison.report import appendix, figures, sections
from transformer_comparison.report.render import Block, Heading, Para, render
from transformer_comparison.report.statistics import best_setting
from transformer_comparison.report.tables import CELL_KEYS, aggregate, collect_rows, load_comparison, sweep_keys, write_results

__all__ = ["add_arguments", "build_report", "run", "write_results"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="a `tcompare compare` output directory")


def run(args: argparse.Namespace) -> int:
    md_path, html_path = build_report(args.dir)
    print(f"report: {md_path} and {html_path}")
    return 0


def _records(table: Any) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in table.to_dict("records")]


def report_blocks(out: Path) -> tuple[str, list[Block]]:
    comparison = load_comparison(out)
    rows, files = collect_rows(out, comparison)
    keys = sweep_keys(comparison)
    grid, seeds = comparison.grid, comparison.grid.seeds
    table = aggregate(rows, keys)
    lr_swept = sections.LEARNING_RATE_KEY in keys
    headline_table = best_setting(table, sections.LEARNING_RATE_KEY, [*CELL_KEYS, *[k for k in keys if k != sections.LEARNING_RATE_KEY]]) \
        if lr_swept else table
    cells, headline = _records(table), _records(headline_table)
    chosen = set(range(len(cells))) if not lr_swept else {table.index.get_loc(i) for i in headline_table.index}
    styles = figures.Styles(grid.attention_types, grid.position_embeddings)
    identity = [*CELL_KEYS, *keys]
    in_headline = {tuple(r[k] for k in identity) for r in headline}
    runs = [figures.Run(row, f) for row, f in zip(rows, files)  # the runs of the ranked settings, for the curves
            if row.status == "completed" and tuple(row.model_dump()[k] for k in identity) in in_headline]

    blocks: list[Block] = sections.overview(comparison, rows, headline, [k for k in keys if k != sections.LEARNING_RATE_KEY])
    blocks.append(Heading("Ranking by validation loss"))
    ranking, notes = sections.ranking(headline, keys, seeds, lr_swept)
    blocks += [*notes[:1], ranking, *notes[1:]] if ranking.rows else [Para("No run has completed yet.")]
    edge = sections.sweep_edge_note(headline, cells, keys) if lr_swept else None
    if edge is not None:
        blocks.append(edge)
    adjusted = sections.adjustments_note(rows)
    if adjusted:
        blocks.append(adjusted)
    for title, table_block in (("Runs that did not complete", sections.problem_table(rows)),
                               ("Cells not trained", sections.skipped_table(comparison))):
        if table_block is not None:
            blocks += [Heading(title), table_block]
    if keys:
        blocks += [Heading("Every swept setting"), Para("One row per mechanism x encoding x swept values (mean over seeds); "
                                                        "`in ranking` marks the rows the ranking uses."),
                   sections.sweep_table(cells, keys, chosen, seeds)]
    if lr_swept:
        image = figures.learning_rate_curves(cells, sections.LEARNING_RATE_KEY, styles, grid.attention_types, out)
        blocks += [Heading("Learning-rate curves"), image] if image else []
    sizes = sections.size_keys(cells, keys)
    if sizes:
        image = figures.scaling_plot(headline, styles, out)
        blocks += [Heading("Scaling: loss against training compute"), *([image] if image else []),
                   Para("Validation loss @ training FLOPs per model size (" + ", ".join(f"`{k}`" for k in sizes) + "):"),
                   sections.scaling_table(headline, sizes)]
    matrices = entropy_matrices(runs)
    plots = [("Validation loss curves", figures.loss_curves(runs, styles, out)),
             ("Throughput and memory", figures.throughput_bars(headline, grid.attention_types, grid.position_embeddings, out)),
             ("Attention entropy", figures.entropy_heatmaps(matrices, out)),
             ("Attention entropy over training", figures.entropy_curves(runs, styles, out))]
    for title, image in plots:
        if image is not None:
            blocks += [Heading(title), image]
    blocks += appendix.kernels_section(out) + appendix.decode_section(out) + appendix.extrapolation_section(out, rows, styles)
    blocks += appendix.probe_section(out) + appendix.extras_section(out) + appendix.environment_section(out, comparison, runs)
    title = f"Attention x position comparison: {comparison.name}" + (" (smoke scale)" if comparison.scale == "smoke" else "")
    return title, blocks


def entropy_matrices(runs: list[figures.Run]) -> dict[tuple[str, str], list[list[float]]]:
    """Per mechanism x encoding, the final attention entropy (layers x heads) averaged over its runs;
    mechanisms without an attention distribution (entropy null) have none."""
    grouped: dict[tuple[str, str], list[list[list[float]]]] = {}
    for run in runs:
        summary = run.files.summary
        if summary is not None and summary.attention_entropy:
            grouped.setdefault((run.row.attention_type, run.row.position_embedding), []).append(summary.attention_entropy)
    result = {}
    for key, matrices in grouped.items():
        shape = (len(matrices[0]), len(matrices[0][0]))
        same = [m for m in matrices if (len(m), len(m[0])) == shape]
        result[key] = [[sum(m[i][j] for m in same) / len(same) for j in range(shape[1])] for i in range(shape[0])]
    return result


def build_report(out: Path) -> tuple[Path, Path]:
    """Rewrite the results files, then report.md and report.html, from what DIR holds."""
    out = Path(out)
    write_results(out)
    title, blocks = report_blocks(out)
    markdown, page = render(title, blocks)
    md_path, html_path = out / "report.md", out / "report.html"
    write_text_atomic(md_path, markdown)
    write_text_atomic(html_path, page)
    return md_path, html_path
