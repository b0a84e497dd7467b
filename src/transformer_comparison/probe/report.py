"""The probe's section of a report, computed from mqar.csv alone:

    section = report_section(Path("results/mqar/mqar.csv"))
    section.table_markdown   # accuracy per mechanism x encoding (rows: mechanism and d_model) at the hardest setting
    section.statement        # what the probe shows, in plain language, from the numbers
    section.state_plot       # accuracy_vs_state_bytes.png (None if it was not drawn)
    section.blocks()         # the same as report.render blocks (Heading, Para, Table, Image)

Every number is the cell's best learning rate, averaged over seeds. The hardest setting is the one
with the most key-value pairs, then the longest training length. Nothing here knows a mechanism by
name: whether a mechanism's state grows with the sequence is read from the state_grows column,
and the window's reach from the fraction_within_* columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from transformer_comparison.errors import UserError
from transformer_comparison.probe.plots import D_MODEL_PLOT, LENGTH_PLOT, STATE_PLOT
from transformer_comparison.probe.results import ProbeRow, best_cells, read_rows

RECALLS = 0.99  # "recalls": the early-stopping bar
CHANCE_MULTIPLE = 1.5  # "near chance": accuracy at most 1.5 / D, not much above picking any of the D values


@dataclass(frozen=True)
class ProbeSection:
    """The recall section of a report."""

    setting: tuple[int, int] | None  # (L, D) of the table: the hardest of the sweep
    headers: list[str]
    rows: list[list[str]]
    table_markdown: str
    statement: str
    state_plot: Path | None = None
    d_model_plot: Path | None = None
    length_plot: Path | None = None
    extrapolation_markdown: str | None = None
    failed_runs: int = 0
    notes: list[str] = field(default_factory=list)

    def blocks(self) -> list:
        """The section as transformer_comparison.report.render blocks, for a comparison report."""
        from transformer_comparison.report.render import Heading, Image, Para, Table

        blocks: list = [Heading("Recall: multi-query associative recall (MQAR)"), Para(self.statement)]
        if self.rows:
            blocks.append(Table(self.headers, self.rows))
        for path, caption in ((self.state_plot, "MQAR accuracy against the decoding state per layer"),
                              (self.d_model_plot, "MQAR accuracy against d_model, one panel per (L, D)"),
                              (self.length_plot, "MQAR accuracy at test lengths beyond training")):
            if path is not None:
                blocks.append(Image(f"probe_{path.name}", caption, path.read_bytes()))
        return blocks


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.3f}"


def _listed(items: list[str], limit: int = 10) -> str:
    """Comma-separated, the first `limit` items and a count of the rest."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _short_of(accuracy: float) -> str:
    """An accuracy below RECALLS, with the third decimal when two would round it up to RECALLS."""
    return f"{accuracy:.3f}" if round(accuracy, 2) >= RECALLS else f"{accuracy:.2f}"


def hardest_setting(summary: pd.DataFrame) -> tuple[int, int]:
    """(L, D) with the most key-value pairs, then the longest length."""
    settings = sorted(set(zip(summary["num_kv_pairs"], summary["seq_len"])))
    pairs, length = settings[-1]
    return int(length), int(pairs)


def accuracy_table(at_length: pd.DataFrame, setting: tuple[int, int]) -> tuple[list[str], list[list[str]]]:
    """Rows mechanism x d_model, a column per encoding, and the state bytes per layer."""
    length, pairs = setting
    part = at_length[(at_length["seq_len"] == length) & (at_length["num_kv_pairs"] == pairs)]
    encodings = list(dict.fromkeys(part["position_embedding"]))
    headers = ["mechanism", "d_model", *encodings, "state bytes / layer"]
    rows = []
    for (mechanism, d_model), group in part.groupby(["attention_type", "d_model"], sort=False):
        by_encoding = dict(zip(group["position_embedding"], group["accuracy"]))
        state = group["state_bytes"].max()
        rows.append([mechanism, str(int(d_model)), *[_fmt(by_encoding.get(e, float("nan"))) for e in encodings],
                     "—" if pd.isna(state) else f"{int(state):,}"])
    return headers, rows


def growth_of_state(at_length: pd.DataFrame) -> dict[str, bool]:
    """Mechanism -> whether its decoding state grows with the sequence (the state_grows column,
    measured per run at twice the training length)."""
    known = at_length.dropna(subset=["state_grows"])
    return {str(m): bool(group["state_grows"].astype(bool).any()) for m, group in known.groupby("attention_type")}


def statement(summary: pd.DataFrame, setting: tuple[int, int], raw: list[ProbeRow]) -> list[str]:
    """Sentences saying what the probe shows, each computed from the table."""
    at_length = summary[summary["test_seq_len"] == summary["seq_len"]]
    length, pairs = setting
    hard = at_length[(at_length["seq_len"] == length) & (at_length["num_kv_pairs"] == pairs)]
    widest = int(hard["d_model"].max())
    top = hard[hard["d_model"] == widest]
    label = lambda r: f"{r.attention_type}+{r.position_embedding}"  # noqa: E731
    recall = [label(r) for r in top.itertuples() if r.accuracy >= RECALLS]
    short = sorted(((r.accuracy, label(r)) for r in top.itertuples() if r.accuracy < RECALLS))
    sentences = [f"Multi-query associative recall at the hardest setting of this sweep (L = {length} tokens, D = {pairs} "
                 f"key-value pairs, d_model = {widest}, each cell at its best learning rate): "
                 + (f"{_listed(recall)} recall{'s' if len(recall) == 1 else ''} (accuracy >= {RECALLS})" if recall
                    else f"no cell reaches accuracy {RECALLS}")
                 + ("; " + _listed([f"{name} {_short_of(acc)}" for acc, name in short]) + " fall short." if short else ".")]
    grows = growth_of_state(at_length)
    if grows and len(set(grows.values())) == 2:
        mean = lambda names: top[top["attention_type"].isin(names)]["accuracy"].mean()  # noqa: E731
        growing = sorted(m for m, g in grows.items() if g)
        fixed = sorted(m for m, g in grows.items() if not g)
        sentences.append(f"Mechanisms whose decoding state grows with the sequence ({', '.join(growing)}) average "
                         f"{mean(growing):.2f} there; those with a fixed-size state ({', '.join(fixed)}) {mean(fixed):.2f}.")
    near_chance = sorted(label(r) for r in top.itertuples() if r.accuracy <= CHANCE_MULTIPLE / pairs)
    if near_chance:
        convolved = any(row.short_conv for row in raw)
        sentences.append(f"{_listed(near_chance)} score at most {CHANCE_MULTIPLE:g}/D = {CHANCE_MULTIPLE / pairs:.2f} "
                         f"(answering with any value of the context scores 1/D = {1 / pairs:.2f}): they have not "
                         "bound keys to the values next to them"
                         + ("." if convolved else
                            "; a fixed-state mechanism needs a token mixer for that, as the papers' models have "
                            "(model.short_conv=4, docs/probe.md)."))
    windowed = top.dropna(subset=["window", "fraction_within_window"])
    for (mechanism, window), group in windowed.groupby(["attention_type", "window"], sort=False):
        first = group.iloc[0]
        layers = int(first["num_layers"])
        scores = ", ".join(f"{r.position_embedding} {r.accuracy:.2f}" for r in group.itertuples())
        sentences.append(f"{mechanism} (window {int(window)}) scores {scores}; {first['fraction_within_window']:.0%} of the "
                         f"queries have their value within one window, {first['fraction_within_layers']:.0%} within the "
                         f"{layers * (int(window) - 1) + 1} positions its {layers} layers can relay.")
    if top["position_embedding"].nunique() > 1:
        by_encoding = top.groupby("position_embedding")["accuracy"].mean().sort_values(ascending=False)
        sentences.append("Averaged over mechanisms there, by encoding: "
                         + ", ".join(f"{e} {a:.2f}" for e, a in by_encoding.items()) + ".")
    if hard["d_model"].nunique() > 1:
        narrow = int(hard["d_model"].min())
        gains = hard.pivot_table(index=["attention_type", "position_embedding"], columns="d_model", values="accuracy")
        improved = int((gains[widest] > gains[narrow] + 0.05).sum())
        sentences.append(f"From d_model {narrow} to {widest}, {improved} of {len(gains)} cells gain more than 0.05 accuracy.")
    budget_bound = [r for r in raw if r.best_for_cell and r.status == "completed" and r.test_seq_len == r.seq_len
                    and r.accuracy is not None and r.accuracy < RECALLS]
    if budget_bound:
        steps = max(r.train_steps or 0 for r in budget_bound)
        sentences.append(f"{len(budget_bound)} best run(s) used their whole budget ({steps} steps) without reaching "
                         f"{RECALLS}; more steps (--max_steps) may raise them, so their accuracy is a lower bound.")
    return sentences


def extrapolation(summary: pd.DataFrame) -> str | None:
    """Markdown: accuracy per test length, at each (L, D)'s largest d_model."""
    longer = summary[summary["test_seq_len"] > summary["seq_len"]]
    if longer.empty:
        return None
    keep = summary[summary.set_index(["attention_type", "position_embedding", "seq_len", "num_kv_pairs", "d_model"])
                   .index.isin(longer.set_index(["attention_type", "position_embedding", "seq_len", "num_kv_pairs",
                                                  "d_model"]).index)]
    widest = keep[keep["d_model"] == keep.groupby(["seq_len", "num_kv_pairs"])["d_model"].transform("max")]
    lengths = sorted(widest["test_seq_len"].unique())
    headers = ["mechanism", "encoding", "trained L", "D", "d_model", *[f"L={int(t)}" for t in lengths]]
    rows = []
    for keys, group in widest.groupby(["attention_type", "position_embedding", "seq_len", "num_kv_pairs", "d_model"], sort=False):
        scores = dict(zip(group["test_seq_len"], group["accuracy"]))
        rows.append([keys[0], keys[1], str(int(keys[2])), str(int(keys[3])), str(int(keys[4])),
                     *[_fmt(scores.get(t, float("nan"))) for t in lengths]])
    return _markdown(headers, rows)


def report_section(csv_path: Path) -> ProbeSection:
    """The recall section from DIR/mqar.csv (plots looked up beside it)."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise UserError(f"{csv_path} does not exist; run `tcompare probe mqar --out {csv_path.parent}` first")
    raw = read_rows(csv_path)
    failed = len({r.run_key for r in raw if r.status == "failed"})
    refused = sorted({f"{r.attention_type}+{r.position_embedding}: {r.note}" for r in raw if r.status == "refused"})
    notes = [f"refused: {text}" for text in refused]
    summary = best_cells(raw)
    plots = {name: (csv_path.parent / name if (csv_path.parent / name).exists() else None)
             for name in (STATE_PLOT, D_MODEL_PLOT, LENGTH_PLOT)}
    if summary.empty:
        return ProbeSection(None, [], [], "", "The probe has no scored runs yet.", failed_runs=failed, notes=notes)
    at_length = summary[summary["test_seq_len"] == summary["seq_len"]]
    setting = hardest_setting(at_length)
    headers, rows = accuracy_table(at_length, setting)
    sentences = statement(summary, setting, raw) + notes
    if failed:
        sentences.append(f"{failed} run(s) failed (mqar.csv `note` says why); re-running the probe retries them.")
    return ProbeSection(
        setting=setting, headers=headers, rows=rows, table_markdown=_markdown(headers, rows), statement=" ".join(sentences),
        state_plot=plots[STATE_PLOT], d_model_plot=plots[D_MODEL_PLOT], length_plot=plots[LENGTH_PLOT],
        extrapolation_markdown=extrapolation(summary), failed_runs=failed, notes=notes,
    )
