"""The report's text and tables: the overview and budget, the ranking with its seed statistics, the
parameter check, every swept setting, the scaling table and the runs that did not complete.

`cells` are the aggregate rows (dicts: the cell's keys, `<metric>_mean`, `<metric>_std`, the
interval); the ranking shows one row per mechanism x encoding (x the other swept values), at its
own best learning rate when the learning rate was swept.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from transformer_comparison.artifacts.comparison import Comparison, ResultRow
from transformer_comparison.report.render import Block, Para, Table
from transformer_comparison.report.statistics import CONFIDENCE, Estimate, group_label, indistinguishable

LEARNING_RATE_KEY = "training.learning_rate"
FLAG_TOLERANCE = 0.10  # cells whose non-embedding parameters differ from dot_product's by more are marked
MIB = 2**20


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, spec: str = ".4f", scale: float = 1.0) -> str:
    if not finite(value):
        return "—" if value is None else str(value)
    return format(value / scale, spec)


def fmt_mean_std(mean: Any, std: Any, spec: str, scale: float = 1.0) -> str:
    text = fmt(mean, spec, scale)
    return f"{text} ± {fmt(std, spec, scale)}" if finite(mean) and finite(std) else text


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


def fmt_flops(value: Any) -> str:
    return f"{value:.3g}" if finite(value) else "—"


def cell_estimate(cell: dict[str, Any]) -> Estimate | None:
    mean = cell.get("final_val_loss_mean")
    if not finite(mean):
        return None
    return Estimate(int(cell.get("completed") or 0), mean, cell.get("final_val_loss_std"),
                    cell.get("final_val_loss_ci_low"), cell.get("final_val_loss_ci_high"))


def cell_identity(cell: dict[str, Any], keys: list[str]) -> tuple:
    """A cell's mechanism, encoding and values of `keys`: the cells that share it differ only in the other keys."""
    return (cell["attention_type"], cell["position_embedding"], *(fmt_value(cell.get(k)) for k in keys))


def cell_label(cell: dict[str, Any], keys: list[str]) -> str:
    extra = ", ".join(f"{k.rsplit('.', 1)[-1]}={fmt_value(cell.get(k))}" for k in keys)
    return f"{cell['attention_type']} + {cell['position_embedding']}" + (f" ({extra})" if extra else "")


# ----------------------------------------------------------------------------------------------
# the budget and the overview


def budget_text(comparison: Comparison) -> str:
    training, model = comparison.config.get("training", {}), comparison.config.get("model", {})
    tokens = (training.get("batch_size") or 0) * (training.get("gradient_accumulation_steps") or 1) * (model.get("context_length") or 0)
    if comparison.budget == "flops":
        budget = (f"FLOP-matched: {training.get('flop_budget'):.3g} training FLOPs per run (6 x non-embedding parameters + "
                  "3 x the mechanism's own attention FLOPs, per token), so each cell trains for the steps its FLOP model "
                  "buys (the per-cell steps are in results.csv `adjustments`)")
    elif comparison.budget == "time" or training.get("time_budget_seconds"):
        budget = f"Time-matched: {training['time_budget_seconds']:g} s of training wall-clock time per run"
        budget += f" (at most {training['max_steps']} steps)" if training.get("max_steps") else ""
    elif training.get("max_steps"):
        budget = f"Tokens-matched: {training['max_steps']} optimizer steps of {tokens:,} tokens ({training['max_steps'] * tokens:,} tokens) per run"
    else:
        budget = f"Tokens-matched: {training.get('num_epochs')} epochs per run"
    return (f"{budget}; model: {model.get('num_layers')} layers, {model.get('num_heads')} heads, d_model {model.get('d_model')}, "
            f"context {model.get('context_length')}")


def overview(comparison: Comparison, rows: list[ResultRow], headline: list[dict[str, Any]], keys: list[str]) -> list[Block]:
    grid = comparison.grid
    counts = Counter(row.status for row in rows)
    blocks: list[Block] = []
    if comparison.note:
        blocks.append(Para(comparison.note, note=True))
    elif comparison.scale == "smoke":
        blocks.append(Para("Smoke-scale comparison: the ranking is indicative only.", note=True))
    axes = "".join(f" x {len(values)} values of `{key}`" for key, values in grid.sweep.items())
    text = (f"{len(grid.attention_types)} attention mechanisms x {len(grid.position_embeddings)} positional encodings{axes} "
            f"x {grid.seeds} seed(s) = {len(rows)} runs: {counts.get('completed', 0)} completed")
    for status in ("failed", "interrupted", "pending"):
        if counts.get(status):
            text += f", {counts[status]} {status}"
    if comparison.skipped:
        text += f"; {len(comparison.skipped)} cell(s) not trained (listed below with the reason)"
    blocks.append(Para(text + "."))
    blocks.append(Para("**Budget.** " + budget_text(comparison) + "."))
    if comparison.jobs > 1 or comparison.executor != "local":
        blocks.append(Para(f"Runs were trained by the {comparison.executor} executor, {comparison.jobs} at a time "
                           f"({comparison.threads_per_job} CPU thread(s) each), so throughput is per run, not per machine."))
    ranked = [c for c in headline if finite(c.get("final_val_loss_mean"))]
    if ranked:
        best = min(ranked, key=lambda c: c["final_val_loss_mean"])
        line = (f"Lowest validation loss: **{cell_label(best, keys)}** ({best['final_val_loss_mean']:.4f} nats/token, "
                f"perplexity {fmt(best.get('final_val_perplexity_mean'), '.2f')}).")
        fastest = max((c for c in ranked if finite(c.get("tokens_per_second_mean"))), key=lambda c: c["tokens_per_second_mean"], default=None)
        if fastest:
            line += f" Highest throughput: **{cell_label(fastest, keys)}** ({fastest['tokens_per_second_mean']:,.0f} tokens/s)."
        blocks.append(Para(line))
    return blocks


# ----------------------------------------------------------------------------------------------
# the ranking


def parameter_flags(cells: list[dict[str, Any]]) -> dict[int, float]:
    """Index -> relative difference of non-embedding parameters from dot_product's, for cells beyond 10%."""
    return {i: c["parameter_ratio_mean"] - 1 for i, c in enumerate(cells)
            if finite(c.get("parameter_ratio_mean")) and abs(c["parameter_ratio_mean"] - 1) > FLAG_TOLERANCE}


COLUMNS = [  # header, metric, format, scale, better (min / max / None: not marked)
    ("val perplexity", "final_val_perplexity", ".2f", 1.0, min),
    ("best val loss (nats/token)", "best_val_loss", ".4f", 1.0, min),
    ("tokens/s", "tokens_per_second", ",.0f", 1.0, max),
    ("step time (ms)", "step_time_ms", ".1f", 1.0, min),
    ("peak memory (MiB)", "peak_memory_bytes", ".2f", MIB, min),
    ("train time (s)", "train_time_seconds", ".1f", 1.0, min),
]


def ranking(headline: list[dict[str, Any]], keys: list[str], seeds: int, lr_swept: bool) -> tuple[Table, list[Block]]:
    """The ranking table (best validation loss first) and the sentences under it."""
    cells = sorted((c for c in headline if c.get("completed")), key=lambda c: c.get("final_val_loss_mean") if finite(c.get("final_val_loss_mean")) else math.inf)
    estimates = [cell_estimate(c) or Estimate(0, math.inf, None, None, None) for c in cells]
    groups = indistinguishable(estimates)
    shown_keys = [k for k in keys if k != LEARNING_RATE_KEY]
    headers = ["#", "attention", "position", *[k.rsplit(".", 1)[-1] for k in shown_keys]]
    headers += ["learning rate"] if lr_swept else []
    headers += ["val loss (nats/token)"] + ([f"{CONFIDENCE:.0%} interval", "group"] if seeds > 1 else [])
    first_metric = len(headers)
    headers += [c[0] for c in COLUMNS] + ["non-embedding parameters", "training FLOPs", "mean attention entropy (nats)"]
    headers += ["seeds"] if seeds > 1 else []
    flags = parameter_flags(cells)
    rows, best = [], set()
    loss_column = headers.index("val loss (nats/token)")
    losses = [c.get("final_val_loss_mean") for c in cells]
    if len({v for v in losses if finite(v)}) > 1:
        best |= {(r, loss_column) for r, v in enumerate(losses) if v == min(v for v in losses if finite(v))}
    for index, (_, metric, _, _, better) in enumerate(COLUMNS):
        values = [c.get(f"{metric}_mean") for c in cells]
        good = [v for v in values if finite(v)]
        if better and len(set(good)) > 1:
            best |= {(r, first_metric + index) for r, v in enumerate(values) if v == better(good)}
    for rank, (cell, group) in enumerate(zip(cells, groups), 1):
        row = [str(rank), cell["attention_type"], cell["position_embedding"], *[fmt_value(cell.get(k)) for k in shown_keys]]
        row += [fmt_value(cell.get(LEARNING_RATE_KEY))] if lr_swept else []
        row.append(fmt_mean_std(cell.get("final_val_loss_mean"), cell.get("final_val_loss_std") if seeds > 1 else None, ".4f"))
        if seeds > 1:
            low, high = cell.get("final_val_loss_ci_low"), cell.get("final_val_loss_ci_high")
            row += [f"{low:.4f} – {high:.4f}" if finite(low) and finite(high) else "—", group_label(group)]
        for _, metric, spec, scale, better in COLUMNS:
            row.append(fmt_mean_std(cell.get(f"{metric}_mean"), cell.get(f"{metric}_std") if seeds > 1 and better else None, spec, scale))
        params = fmt(cell.get("non_embedding_parameters_mean"), ",.0f")
        row.append(params + (" †" if rank - 1 in flags else ""))
        row.append(fmt_flops(cell.get("training_flops_mean")))
        entropy = cell.get("mean_attention_entropy_mean")
        row.append(fmt(entropy, ".3f") if finite(entropy) else "n/a")
        row += [f"{cell['completed']}/{cell['seeds']}"] if seeds > 1 else []
        rows.append(row)
    return Table(headers, rows, best), ranking_notes(cells, groups, flags, keys, seeds, lr_swept)


def ranking_notes(cells: list[dict[str, Any]], groups: list[int], flags: dict[int, float], keys: list[str], seeds: int,
                  lr_swept: bool) -> list[Block]:
    legend = "Sorted by final validation loss; the best value of each column is in bold."
    if seeds > 1:
        legend += (f" Values are mean ± std (sample) over the completed seeds; the interval is the {CONFIDENCE:.0%} Student-t "
                   "interval of the mean. Cells in one **group** have intervals overlapping the group's first cell: "
                   "they are not distinguishable at these seeds, and their order within the group is noise.")
    else:
        legend += " One seed: no interval; differences smaller than the seed-to-seed spread (measure it with --seeds 3) are noise."
    if lr_swept:
        legend += (" Each row is trained at its own best learning rate (lowest mean validation loss over the swept rates, named "
                   "in the table); the rate is chosen on the same validation loss that is reported, as zoology does, so the "
                   "numbers are slightly optimistic for every cell alike.")
    blocks: list[Block] = [Para(legend)]
    if seeds > 1 and len(set(groups)) < len(groups):
        tied = Counter(groups)
        named = [" = ".join(cell_label(c, keys) for c, g in zip(cells, groups) if g == group) for group, n in tied.items() if n > 1]
        blocks.append(Para("Not distinguishable at these seeds: " + "; ".join(named) + "."))
    if flags:
        parts = [f"{cell_label(cells[i], keys)} {100 * diff:+.1f}%" for i, diff in flags.items()]
        blocks.append(Para("Non-embedding parameter counts differ by more than 10% from dot_product's at the same config "
                           "(marked †): " + "; ".join(parts) + ". Compare their losses with that in mind, or rerun with "
                           "`--match params`."))
    else:
        spread = [abs(c["parameter_ratio_mean"] - 1) for c in cells if finite(c.get("parameter_ratio_mean"))]
        if spread and max(spread) > 0:
            blocks.append(Para(f"Non-embedding parameter counts are within {100 * max(spread):.1f}% of dot_product's at the same "
                               "config (the report marks cells beyond 10%)."))
    return blocks


def sweep_edge_note(headline: list[dict[str, Any]], cells: list[dict[str, Any]], keys: list[str]) -> Para | None:
    """The ranked cells whose best learning rate is the smallest or the largest one swept: their
    optimum may lie outside the sweep, so the ranking may understate them."""
    others = [k for k in keys if k != LEARNING_RATE_KEY]
    swept: dict[tuple, list[float]] = {}
    for cell in cells:
        if finite(cell.get(LEARNING_RATE_KEY)):
            swept.setdefault(cell_identity(cell, others), []).append(cell[LEARNING_RATE_KEY])
    edges = []
    for cell in headline:
        rates, best = swept.get(cell_identity(cell, others), []), cell.get(LEARNING_RATE_KEY)
        if len(set(rates)) < 2 or not finite(cell.get("final_val_loss_mean")) or not finite(best):
            continue
        if best in (min(rates), max(rates)):
            side = "smallest" if best == min(rates) else "largest"
            edges.append(f"{cell_label(cell, others)} at {fmt_value(best)}, the {side} rate swept")
    if not edges:
        return None
    return Para("At the edge of the learning-rate sweep: " + "; ".join(edges) + ". The best rate of these cells may lie "
                "outside the swept range, so their loss may be overstated; extend `--sweep training.learning_rate` past "
                "it into the same --out to be sure (the grid grows: only the new runs train).")


def adjustments_note(rows: list[ResultRow]) -> Para | None:
    """What --match params (or a FLOP budget) changed, per mechanism x encoding."""
    changed = {f"{r.attention_type} + {r.position_embedding}": r.adjustments for r in rows if r.adjustments}
    if not changed:
        return None
    return Para("Adjusted per cell by compare: " + "; ".join(f"{cell}: `{text}`" for cell, text in changed.items()) + ".")


# ----------------------------------------------------------------------------------------------
# every swept setting, and the scaling table


def sweep_table(cells: list[dict[str, Any]], keys: list[str], chosen: set[int], seeds: int) -> Table:
    headers = ["attention", "position", *keys, "val loss (nats/token)"] + ([f"{CONFIDENCE:.0%} interval"] if seeds > 1 else [])
    headers += ["non-embedding parameters", "training FLOPs", "completed", "in ranking"]
    rows = []
    for index, cell in enumerate(cells):
        row = [cell["attention_type"], cell["position_embedding"], *[fmt_value(cell.get(k)) for k in keys],
               fmt_mean_std(cell.get("final_val_loss_mean"), cell.get("final_val_loss_std"), ".4f")]
        if seeds > 1:
            low, high = cell.get("final_val_loss_ci_low"), cell.get("final_val_loss_ci_high")
            row.append(f"{low:.4f} – {high:.4f}" if finite(low) and finite(high) else "—")
        row += [fmt(cell.get("non_embedding_parameters_mean"), ",.0f"), fmt_flops(cell.get("training_flops_mean")),
                f"{cell['completed']}/{cell['seeds']}",
                "yes" if index in chosen and finite(cell.get("final_val_loss_mean")) else ""]
        rows.append(row)
    return Table(headers, rows)


def size_keys(cells: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The swept keys that change a cell's parameter count (model.d_model, model.num_layers, ...)."""
    found = []
    for key in keys:
        if key == LEARNING_RATE_KEY:
            continue
        others = [k for k in keys if k != key]
        by_cell: dict[tuple, set] = {}
        for c in cells:
            by_cell.setdefault(cell_identity(c, others), set()).add(c.get("non_embedding_parameters_mean"))
        if any(len({v for v in values if finite(v)}) > 1 for values in by_cell.values()):
            found.append(key)
    return found


def scaling_table(headline: list[dict[str, Any]], sizes: list[str]) -> Table:
    """Loss @ training FLOPs per mechanism x encoding (rows) and model size (columns)."""
    def point(c: dict[str, Any]) -> tuple:
        return tuple(c.get(k) for k in sizes)

    points = sorted({point(c) for c in headline}, key=lambda p: tuple((0, v) if finite(v) else (1, str(v)) for v in p))
    headers = ["attention", "position", *[", ".join(f"{k.rsplit('.', 1)[-1]}={fmt_value(v)}" for k, v in zip(sizes, p)) for p in points]]
    by_line: dict[tuple[str, str], dict[tuple, dict[str, Any]]] = {}
    for c in headline:
        by_line.setdefault((c["attention_type"], c["position_embedding"]), {})[point(c)] = c
    rows = []
    for (attention, position), by_point in by_line.items():
        cells = [by_point.get(p) for p in points]
        rows.append([attention, position, *[f"{fmt(c.get('final_val_loss_mean'))} @ {fmt_flops(c.get('training_flops_mean'))}"
                                            if c else "—" for c in cells]])
    return Table(headers, rows)


def problem_table(rows: list[ResultRow]) -> Table | None:
    bad = [row for row in rows if row.status != "completed"]
    if not bad:
        return None
    return Table(["attention", "position", "seed", "status", "error", "log"],
                 [[r.attention_type, r.position_embedding, str(r.seed), r.status,
                   r.error or ("not run yet" if r.status == "pending" else ""), f"{r.run}/train.log"] for r in bad])


def skipped_table(comparison: Comparison) -> Table | None:
    if not comparison.skipped:
        return None
    return Table(["attention", "position", "swept values", "why it is not trained"],
                 [[s.attention_type, s.position_embedding, ", ".join(f"{k}={fmt_value(v)}" for k, v in s.sweep.items()) or "all",
                   s.reason] for s in comparison.skipped])
