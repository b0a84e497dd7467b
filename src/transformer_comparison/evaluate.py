"""`tcompare eval`: length extrapolation, validation perplexity of a trained run at lengths beyond its training context.

For each evaluation length L the run's own validation split (its config's `data` section, checked
against the run's tokenizer.json) is cut into windows of L input tokens (+1 for the last target):

* non-overlapping (the default, stride S = L): windows start at 0, L, 2L, ...; every target of every
  window is scored, so the first targets of each window have little context. At L equal to the
  training context these are exactly the windows `tcompare train` evaluates on when
  `training.eval_batches` is null, and the loss is the same.
* sliding (`--stride S`, 1 <= S <= L; Press et al. 2022, "Train Short, Test Long", section 4.2):
  windows start at 0, S, 2S, ...; the first window scores all L targets, every later window only
  its last S, so each target is scored exactly once, with L - S to L - 1 tokens of context
  (the first window's targets with fewer).

With N validation tokens there are W = (N - 1 - L) // S + 1 windows (the first `--max_windows` of
them when capped) and L + (W - 1) * S scored targets: validation tokens 1 .. L + (W - 1) * S,
contiguous, each once. Fewer than S (sliding) or L (non-overlapping) tokens at the end of the split
are left unscored. The loss is the mean next-token cross-entropy over the scored targets (nats),
computed in float32 with the model in eval mode under no_grad, accumulated in float64.

Writes RUN/extrapolation.csv (`eval_length, stride, val_loss, val_perplexity` then `num_windows,
tokens_scored, train_context_length, attention_type, position_embedding, position_scaling`),
RUN/extrapolation.png and prints a table; under `--rope_scaling` the default files are
RUN/extrapolation-KINDFACTOR.csv and .png (e.g. extrapolation-yarn16.csv), so they never replace the
plain evaluation's. `plot_extrapolation(rows_by_run, path)` draws several runs on one figure (the
comparison report reuses it); `read_extrapolation_csv(path)` reads the CSV back with numbers typed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from transformer_comparison.artifacts.evaluation import CSV_COLUMNS, ExtrapolationRow
from transformer_comparison.artifacts.io import read_csv, write_csv
from transformer_comparison.errors import UserError
from transformer_comparison.numerics import prepare_process
from transformer_comparison.plots import Panel, loglog_figure, number, save_png
from transformer_comparison.resources import check_fits, evaluation_memory, is_out_of_memory
from transformer_comparison.run_dir import evaluation_csv
from transformer_comparison.validation import windows_to_batch

__all__ = ["CSV_COLUMNS", "evaluate_lengths", "plot_extrapolation", "read_extrapolation_csv", "score_windows", "window_plan"]
DEFAULT_BATCH_TOKENS = 4096  # default windows per forward pass: max(1, DEFAULT_BATCH_TOKENS // L)
DEFAULT_LENGTHS = "64,128,256,512,1024"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, metavar="DIR", help="a run directory written by tcompare train")
    parser.add_argument("--lengths", nargs="+", default=[DEFAULT_LENGTHS], metavar="L[,L...]",
                        help=f"evaluation lengths in tokens, comma- or space-separated (default {DEFAULT_LENGTHS})")
    parser.add_argument("--stride", metavar="S",
                        help="sliding-window evaluation: windows every S tokens, scoring the last S of each "
                             "(default: S = L, non-overlapping windows, every token scored)")
    parser.add_argument("--max_windows", metavar="N", help="evaluate only the first N windows per length (default: all)")
    parser.add_argument("--batch_size", metavar="B", help=f"windows per forward pass (default: max(1, {DEFAULT_BATCH_TOKENS} // L))")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="the CSV to write (default DIR/extrapolation.csv, or DIR/extrapolation-yarn16.csv and the "
                             "like under --rope_scaling); the plot goes next to it as FILE with .png")
    parser.add_argument("--rope_scaling", default=None, metavar="KIND",
                        help="evaluate with a RoPE scaling the model was not trained with: linear (position "
                             "interpolation), ntk or yarn (position.rope.scaling; needs a run whose encoding has it)")
    parser.add_argument("--rope_scaling_factor", type=float, default=None, metavar="F",
                        help="the factor s (>= 1) of --rope_scaling (default: the longest length / the training context)")


# ----------------------------------------------------------------------------------------------
# argument checks


def positive_int(name: str, text: Any) -> int:
    """`text` as an int >= 1, or a UserError naming the option."""
    value = str(text).strip()
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise UserError(f"{name} must be a positive integer, got {number}")
    return number


def parse_lengths(values: str | Sequence[str]) -> list[int]:
    """'64,128' or ['64', '128'] or ['64,128', '256'] -> sorted distinct positive lengths."""
    items = [values] if isinstance(values, str) else list(values)
    parts = [part for item in items for part in str(item).split(",")]
    if not any(part.strip() for part in parts):
        raise UserError("--lengths is empty; give positive integers such as 64,128,256")
    return sorted({positive_int("--lengths", part) for part in parts if part.strip()})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; valid here: auto, cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available; valid here: auto, cpu")
    return device


# ----------------------------------------------------------------------------------------------
# windows and scoring


@dataclass(frozen=True)
class WindowPlan:
    """Which windows are evaluated at one length, and which of their targets are scored.

    Window i holds inputs tokens[starts[i] : starts[i] + length] and targets one token later;
    its targets at offsets score_from[i] .. length - 1 are scored.
    """

    length: int
    stride: int
    starts: np.ndarray
    score_from: np.ndarray

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    @property
    def tokens_scored(self) -> int:
        return int(np.sum(self.length - self.score_from))


def window_plan(num_tokens: int, length: int, stride: int | None = None, max_windows: int | None = None) -> WindowPlan:
    """The windows of `length` inputs over a split of `num_tokens` tokens (module docstring).

    stride None means non-overlapping (stride = length). Zero windows when num_tokens < length + 1.
    """
    stride = length if stride is None else stride
    if not 1 <= stride <= length:
        raise UserError(f"--stride must be between 1 and the evaluation length {length}, got {stride}")
    count = max(0, (num_tokens - 1 - length) // stride + 1) if num_tokens >= length + 1 else 0
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count, dtype=np.int64) * stride
    score_from = np.full(count, length - stride, dtype=np.int64)
    if count:
        score_from[0] = 0
    return WindowPlan(length, stride, starts, score_from)


@torch.no_grad()
def score_windows(model: torch.nn.Module, tokens: np.ndarray, plan: WindowPlan, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss (nats) over the scored targets of `plan`; the model is put in eval mode."""
    if plan.num_windows == 0:
        raise ValueError("score_windows needs at least one window")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    offsets = torch.arange(plan.length, device=device)
    for begin in range(0, plan.num_windows, batch_size):
        x, y = windows_to_batch(tokens, plan.starts[begin : begin + batch_size], plan.length, device)
        logits, _, _ = model(x)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
        score_from = torch.from_numpy(plan.score_from[begin : begin + batch_size]).to(device)
        scored = offsets[None, :] >= score_from[:, None]
        total += losses.double().masked_fill(~scored, 0.0).sum()
    model.train(was_training)
    return total.item() / plan.tokens_scored


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_lengths(
    model: torch.nn.Module,
    tokens: np.ndarray,
    lengths: Sequence[int],
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Rows (eval_length, stride, val_loss, val_perplexity, num_windows, tokens_scored) for each length
    that fits in `tokens`, and {length: why it was skipped} for those that do not."""
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    skipped: dict[int, str] = {}
    for length in lengths:
        plan = window_plan(len(tokens), length, stride, max_windows)
        if plan.num_windows == 0:
            skipped[length] = (f"the validation split has {len(tokens)} tokens, fewer than one window of "
                               f"{length} inputs + 1 target ({length + 1})")
            continue
        per_batch = batch_size or max(1, DEFAULT_BATCH_TOKENS // length)
        loss = score_windows(model, tokens, plan, per_batch, device)
        rows.append({"eval_length": length, "stride": plan.stride, "val_loss": loss, "val_perplexity": perplexity(loss),
                     "num_windows": plan.num_windows, "tokens_scored": plan.tokens_scored})
    return rows, skipped


# ----------------------------------------------------------------------------------------------
# a run


def with_position_scaling(model: torch.nn.Module, cfg: Any, scaling: str, factor: float) -> tuple[torch.nn.Module, Any]:
    """The same trained weights in a model whose encoding uses `scaling` with `factor` (an evaluation-time
    option of the encoding: `position.<type>.scaling`, `.scaling_factor`); refused if it has none."""
    from transformer_comparison.config import with_overrides
    from transformer_comparison.model import build_model
    from transformer_comparison.position import options_model

    encoding = cfg.position.type
    fields = options_model(encoding).model_fields
    if "scaling" not in fields or "scaling_factor" not in fields:
        raise UserError(f"--rope_scaling needs a run whose encoding can be scaled (rope); this run uses {encoding}")
    scaled = with_overrides(cfg, [f"position.{encoding}.scaling={scaling}", f"position.{encoding}.scaling_factor={factor}"])
    rebuilt = build_model(scaled, model.config.vocab_size)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.to(next(model.parameters()).device).eval(), scaled


def load_run_and_validation(run_dir: Path, device: torch.device) -> tuple[torch.nn.Module, np.ndarray, Any]:
    """The run's model (eval mode, on `device`), its validation tokens and its config.

    The validation split is rebuilt from the run's config; its tokenizer must be the run's
    tokenizer.json, else the tokens would not mean what the model learned.
    """
    from transformer_comparison.data import prepare_data
    from transformer_comparison.generate import load_run

    model, tokenizer, cfg = load_run(run_dir)
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    if data.tokenizer.identity != tokenizer.identity:
        raise UserError(
            f"the validation data rebuilt from {run_dir / 'config.yaml'} is tokenised differently from the run's tokenizer.json "
            f"({data.tokenizer.name} with {data.tokenizer.vocab_size} symbols, identity {data.tokenizer.identity}, vs "
            f"{tokenizer.name} with {tokenizer.vocab_size} symbols, identity {tokenizer.identity}): the dataset or "
            f"data.cache_dir changed since training"
        )
    return model.to(device).eval(), data.val, cfg


def run(args: argparse.Namespace) -> int:
    lengths = parse_lengths(args.lengths)
    stride = None if args.stride is None else positive_int("--stride", args.stride)
    max_windows = None if args.max_windows is None else positive_int("--max_windows", args.max_windows)
    batch_size = None if args.batch_size is None else positive_int("--batch_size", args.batch_size)
    if stride is not None and stride > lengths[0]:
        raise UserError(f"--stride {stride} is larger than the evaluation length {lengths[0]}; "
                        f"the stride must be between 1 and the smallest length")
    device = resolve_device(args.device)
    prepare_process()
    run_dir: Path = args.run
    if args.out is not None and args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; give the CSV file to write (e.g. {args.out / 'extrapolation.csv'})")

    model, val, cfg = load_run_and_validation(run_dir, device)
    scaling = "none"
    if args.rope_scaling is not None or args.rope_scaling_factor is not None:
        kind = args.rope_scaling or "linear"
        factor = args.rope_scaling_factor or max(1.0, max(lengths) / cfg.model.context_length)
        model, cfg = with_position_scaling(model, cfg, kind, factor)
        scaling = f"{kind}:{factor:g}"
    out_csv: Path = args.out or evaluation_csv(run_dir, scaling)
    check_eval_memory(model, cfg, [n for n in lengths if window_plan(len(val), n, stride, 1).num_windows], batch_size, device)
    try:
        rows, skipped = evaluate_lengths(model, val, lengths, stride, max_windows, batch_size, device)
    except Exception as error:
        if is_out_of_memory(error):
            raise UserError(f"out of memory evaluating {run_dir} ({' '.join(str(error).split())[:120]}); "
                            "give smaller --lengths or --batch_size") from None
        raise
    if not rows:
        raise UserError(f"no evaluation length fits the validation split of {run_dir} ({len(val)} tokens): "
                        f"lengths up to {len(val) - 1} can be evaluated")
    table = [ExtrapolationRow(**row, train_context_length=cfg.model.context_length, attention_type=cfg.attention.type,
                              position_embedding=cfg.position.type, position_scaling=scaling) for row in rows]
    for length, why in skipped.items():
        print(f"tcompare eval: skipping length {length}: {why}", file=sys.stderr)

    write_extrapolation_csv(table, out_csv)
    label = f"{cfg.attention.type} + {cfg.position.type}" + ("" if scaling == "none" else f" ({scaling})")
    out_png = plot_extrapolation({label: [r.model_dump() for r in table]},
                                 out_csv.with_suffix(".png"))
    print(format_table(rows, skipped, cfg.model.context_length))
    print(f"wrote {out_csv} and {out_png}")
    return 0


def check_eval_memory(model: torch.nn.Module, cfg: Any, lengths: Sequence[int], batch_size: int | None, device: torch.device) -> None:
    """Refuse (before evaluating anything) a length whose forward pass cannot fit in memory."""
    vocab_size = model.config.vocab_size
    for length in lengths:
        batch = batch_size or max(1, DEFAULT_BATCH_TOKENS // length)
        estimate = evaluation_memory(cfg, vocab_size, batch, length)
        check_fits(estimate, device, f"evaluating at length {length} ({batch} window{'s' * (batch > 1)} per pass)",
                   "give smaller --lengths (or --batch_size)")


# ----------------------------------------------------------------------------------------------
# output


def format_table(rows: Sequence[Mapping[str, Any]], skipped: Mapping[int, str], train_context_length: int) -> str:
    header = f"{'eval_length':>11}  {'stride':>6}  {'windows':>7}  {'tokens':>8}  {'val_loss':>8}  {'perplexity':>10}"
    lines = [header]
    entries = [(int(r["eval_length"]), r) for r in rows] + [(length, None) for length in skipped]
    for length, row in sorted(entries, key=lambda entry: entry[0]):
        note = "  (training context)" if length == train_context_length else ""
        if row is None:
            lines.append(f"{length:>11}  {'':>6}  {'':>7}  {'':>8}  {'skipped (validation split too short)'}")
        else:
            lines.append(f"{length:>11}  {row['stride']:>6}  {row['num_windows']:>7}  {row['tokens_scored']:>8}  "
                         f"{row['val_loss']:>8.4f}  {row['val_perplexity']:>10.3f}{note}")
    return "\n".join(lines)


def write_extrapolation_csv(rows: Sequence[ExtrapolationRow], path: Path) -> None:
    """Write rows (CSV_COLUMNS, in order) atomically; losses with full float precision."""
    write_csv(path, rows, ExtrapolationRow)


def read_extrapolation_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an extrapolation.csv as dicts with numbers typed (a missing loss or perplexity is nan);
    UserError naming the file and line if it is not one."""
    rows = []
    for row in read_csv(path, ExtrapolationRow):
        values = row.model_dump()
        for key in ("val_loss", "val_perplexity"):
            values[key] = math.nan if values[key] is None else values[key]
        rows.append(values)
    return rows


def plot_extrapolation(rows_by_run: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str | None = None) -> Path:
    """Plot validation perplexity against evaluation length, one line per run, and save a PNG.

    rows_by_run: {legend label: rows}, each row a mapping with `eval_length` and `val_perplexity`
    (numbers or numeric strings, e.g. straight from csv.DictReader or read_extrapolation_csv) and
    optionally `train_context_length`. Points with a missing or non-finite perplexity are left out.
    Drawn by plots.loglog_figure (the one log-log plot of every command): x log2 with ticks at the
    plotted lengths, y log when the perplexities span more than a factor of 5, every distinct
    training context a dotted vertical line. Returns the path written.
    """
    path = Path(path)
    rows = [{**row, "run": str(label)} for label, run_rows in rows_by_run.items() for row in run_rows]
    contexts = {number(row.get("train_context_length")) for row in rows}
    fig = loglog_figure(rows, "eval_length", [Panel("val_perplexity", "validation perplexity")], line="run",
                        xlabel="evaluation length (tokens)", title=title or "Length extrapolation",
                        vlines=sorted(c for c in contexts if math.isfinite(c)), log_y=None)
    if fig is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no finite perplexities to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title or "Length extrapolation")
    save_png(fig, path)
    return path
