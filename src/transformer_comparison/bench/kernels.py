"""`tcompare bench kernels`: time and peak memory of each attention kernel against sequence length.

Every case (mechanism, seq_len, pass) runs in a fresh Python process (`bench/kernel_case.py`), which
isolates out-of-memory and lets a per-case timeout kill it; a failing case is recorded with its status,
never raised. The cases run `--repeats` rounds, each round every case once, ordered by length. A
case's time is the median of its rounds. Its ratio to torch's SDPA is the median of per-round
ratios, and each round's ratio is timed inside the case's process, the kernel and SDPA alternately
(`kernel_case.time_paired`), so that a machine whose speed drifts moves both sides of it alike;
where SDPA cannot run beside the kernel in some round, every round's ratio is against SDPA's own case
in that round instead (`ratios_to_reference`).
The mechanisms are the registry's, with their options from the config schema (defaults, `--config
FILE`, and `section.key=value` overrides such as `attention.local.window=128`), their key/value heads
from their own policy and their FLOPs from their own model; torch's SDPA runs beside them as the
reference. docs/benchmarks.md has the method and how to read the outputs:

    DIR/kernels.csv  kernels_crossover.csv  kernels_time.png  kernels_memory.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from transformer_comparison.artifacts.bench import CrossoverRow, KernelRow
from transformer_comparison.artifacts.io import write_csv
from transformer_comparison.attention import build_attention, kernel_class
from transformer_comparison.attention.registry import baseline_name, registered_names
from transformer_comparison.bench.common import (
    choose, comma_list, options_text, positive_ints, resolve_device, run_child,
)
from transformer_comparison.bench.kernel_case import DTYPES, REFERENCE, RESULT_PREFIX
from transformer_comparison.errors import UserError
from transformer_comparison.plots import Panel, loglog_figure, save_png
from transformer_comparison.position import position_names

PASSES = ("forward", "forward_backward")
FAILED_STATUSES = ("oom", "timeout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=positive_ints, default=[512, 1024, 2048, 4096],
                        help="comma-separated sequence lengths (default: 512,1024,2048,4096)")
    parser.add_argument("--mechanisms", type=comma_list, default=None,
                        help=f"comma-separated mechanisms (default: every registered one and {REFERENCE}); the "
                             f"vs_sdpa ratio needs {REFERENCE} among them, the crossover table the baseline "
                             "(dot_product)")
    parser.add_argument("--passes", type=comma_list, default=list(PASSES),
                        help=f"comma-separated, of {', '.join(PASSES)} (default: both)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=None,
                        help="key/value heads (attention.num_kv_heads) for every mechanism whose policy takes it "
                             "(default: heads; gqa follows attention.gqa.kv_heads)")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal masking (default: on)")
    parser.add_argument("--position_embedding", default=None,
                        help="what each kernel receives, as the model gives it: nothing (sinusoidal, nope), rotated q "
                             "and k (rope) or a bias per head (alibi); torch_sdpa gets q and k rotated before it, or "
                             "ALiBi as a dense n x n mask (default: the config's position.type)")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for each case (default: torch's default, what training would use)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is killed (default: %(default)s)")
    parser.add_argument("--min_run_time", type=float, default=1.0, help="seconds of timed runs per case (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over every case, each case in a fresh process every round; a case's time is the "
                             "median over rounds, its ratio to torch_sdpa the median of per-round ratios, each timed "
                             "alternately with torch_sdpa in the case's process (default: %(default)s)")
    parser.add_argument("--memory_limit", default="auto",
                        help="GiB a CPU case may allocate before it fails as oom: a number, 'auto' (90%% of available "
                             "memory when the case starts) or 'none'")
    parser.add_argument("--keep_going", action="store_true",
                        help="also run lengths above one that ran out of memory or time (default: record them as skipped)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="a YAML config whose attention/position sections give the mechanisms' options (default: the defaults)")
    parser.add_argument("--out", default="results/bench", help="output directory (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="mechanism options, e.g. attention.local.window=128 (or attention.window=128)")


# --------------------------------------------------------------------------- validation


def parse_memory_limit(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--memory_limit {text!r} is not a number of GiB, 'auto' or 'none'") from None
    if value <= 0:
        raise UserError(f"--memory_limit must be > 0 GiB, got {text}")
    return value


def mechanism_setup(name: str, cfg: Any, heads: int, kv_heads: int | None) -> tuple[dict[str, Any], int]:
    """(options, kv heads) of one mechanism: its config subsection and its own kv-head policy."""
    from transformer_comparison.config import kernel_options_for, with_overrides

    if name == REFERENCE:
        return {}, kv_heads or heads
    options = kernel_options_for(with_overrides(cfg, [f"attention.type={name}"]))
    try:
        return options, build_attention(name, **options).kv_heads(heads, kv_heads)
    except ValueError as error:
        raise UserError(f"{name}: {error}") from None


def build_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate the command line and return one JSON-able case per (mechanism, pass, seq_len)."""
    from transformer_comparison.config import load_config, position_options_for

    valid = [*registered_names(), REFERENCE]
    mechanisms = choose(args.mechanisms or valid, valid, "--mechanisms")
    passes = choose(args.passes, PASSES, "--passes")
    if args.position_embedding is not None:
        choose([args.position_embedding], position_names(), "--position_embedding")
    choose([args.dtype], list(DTYPES), "--dtype")
    for name in ("batch", "heads", "head_dim", "threads", "kv_heads", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        raise UserError(f"--kv_heads {args.kv_heads} must divide --heads {args.heads}")
    if args.timeout <= 0 or args.min_run_time <= 0:
        raise UserError("--timeout and --min_run_time must be > 0 seconds")
    cfg = load_config(args.config, args.overrides, position_embedding=args.position_embedding)
    position = cfg.position.type
    memory_limit = parse_memory_limit(args.memory_limit)
    device = resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()

    # Every kernel is timed against torch's SDPA in its own process when SDPA is in the run (kernel_case.py).
    pair_with = None
    if REFERENCE in mechanisms:
        pair_with = {"kv_heads": mechanism_setup(REFERENCE, cfg, args.heads, args.kv_heads)[1]}
    cases = []
    for mechanism in mechanisms:
        options, kv_heads = mechanism_setup(mechanism, cfg, args.heads, args.kv_heads)
        refused = kernel_class(mechanism).refused_positions.get(position) if mechanism != REFERENCE else None
        for pass_name in passes:
            for n in args.lengths:
                cases.append({
                    "mechanism": mechanism, "seq_len": n, "pass": pass_name, "batch": args.batch, "heads": args.heads,
                    "kv_heads": kv_heads, "head_dim": args.head_dim, "causal": args.causal, "dtype": args.dtype,
                    "position_embedding": position, "position_options": position_options_for(cfg),
                    "device": device, "threads": threads, "min_run_time": args.min_run_time,
                    "memory_limit": memory_limit, "options": options, "refused": refused,
                    "pair_with": None if mechanism == REFERENCE else pair_with, "pair_budget_s": args.timeout / 4,
                })
    return cases


# --------------------------------------------------------------------------- results


def attention_flops(case: dict[str, Any]) -> float:
    """FLOPs of one pass from the mechanism's own FLOP model (torch_sdpa: the baseline's); backward 2x forward."""
    name = baseline_name() if case["mechanism"] == REFERENCE else case["mechanism"]
    n = case["seq_len"]
    forward = build_attention(name, **({} if case["mechanism"] == REFERENCE else case["options"])).flops(
        batch=case["batch"], heads=case["heads"], nq=n, nk=n, head_dim=case["head_dim"], causal=case["causal"])
    return forward * (3 if case["pass"] == "forward_backward" else 1)


def make_row(case: dict[str, Any], result: dict[str, Any], ratios: list[float] | None = None,
             ratio_method: str | None = None) -> KernelRow:
    time_ms = result.get("time_ms")
    flops = attention_flops(case)
    return KernelRow(
        mechanism=case["mechanism"], seq_len=case["seq_len"], **{"pass": case["pass"]}, time_ms=time_ms,
        peak_memory_bytes=result.get("peak_memory_bytes"), status=result["status"],
        gflops_per_second=flops / (time_ms * 1e-3) / 1e9 if flops and time_ms else None,
        peak_rss_delta_bytes=result.get("peak_rss_delta_bytes"), memory_method=result.get("memory_method"),
        position_embedding=case["position_embedding"], batch=case["batch"], heads=case["heads"],
        kv_heads=case["kv_heads"], head_dim=case["head_dim"], causal=case["causal"], dtype=case["dtype"],
        device=case["device"], threads=case["threads"], options=options_text(case["options"]),
        time_ms_min=result.get("time_ms_min", time_ms), time_ms_max=result.get("time_ms_max", time_ms),
        repeats=result.get("repeats", 1 if time_ms is not None else 0),
        time_ratio_to_reference=statistics.median(ratios) if ratios else None,
        round_ratios=" ".join(f"{ratio:.3f}" for ratio in ratios) if ratios else None,
        round_times_ms=result.get("round_times_ms", None if time_ms is None else f"{time_ms:.3f}"),
        ratio_method=ratio_method,
    )


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from a case's rounds: ok only if every round was, with the median time, its range and the
    largest peak memory of any round; otherwise the first failure."""
    failed = next((result for result in rounds if result["status"] != "ok"), None)
    if failed is not None:
        return failed
    times = [result["time_ms"] for result in rounds]
    largest = max(rounds, key=lambda result: result["peak_memory_bytes"] or 0)
    return {**largest, "time_ms": statistics.median(times), "time_ms_min": min(times), "time_ms_max": max(times),
            "repeats": len(rounds), "round_times_ms": " ".join(f"{t:.3f}" for t in times)}


def round_ratios(numerator: list[dict[str, Any]], denominator: list[dict[str, Any]]) -> list[float]:
    """numerator / denominator time per round, from the rounds where both ran ok (the lists are round by
    round: a case that failed is not run again, so its list stops there)."""
    return [a["time_ms"] / b["time_ms"] for a, b in zip(numerator, denominator)
            if a["status"] == b["status"] == "ok" and b["time_ms"] > 0]


def median_ratio(numerator: list[dict[str, Any]], denominator: list[dict[str, Any]]) -> float | None:
    """Median over rounds of numerator / denominator time (`round_ratios`); None if no round has both."""
    ratios = round_ratios(numerator, denominator)
    return statistics.median(ratios) if ratios else None


def ratios_to_reference(
    case: dict[str, Any], rounds: list[dict[str, Any]], baseline: list[dict[str, Any]] | None,
) -> tuple[list[float], str | None]:
    """(per-round ratios, method) of a case against torch_sdpa: "paired", each round's ratio timed
    alternately in the case's own process, when every round that ran ok has one; otherwise "rounds",
    each round's time over torch_sdpa's own case in that round (`round_ratios`); "reference" for torch_sdpa."""
    if case["mechanism"] == REFERENCE:
        return [1.0 for result in rounds if result["status"] == "ok"], "reference"
    paired = [result.get("paired_ratio") for result in rounds if result["status"] == "ok"]
    if paired and all(ratio is not None for ratio in paired):
        return [float(ratio) for ratio in paired if ratio is not None], "paired"
    ratios = round_ratios(rounds, baseline) if baseline else []
    return ratios, "rounds" if ratios else None


def summarise(cases: list[dict[str, Any]], results: list[list[dict[str, Any]]]) -> list[KernelRow]:
    """A row per case that has run at least once, in the cases' order, with its ratio to torch_sdpa at the
    same length and pass (when torch_sdpa is among the mechanisms; `ratios_to_reference`): the median of
    its per-round ratios, which the row also lists."""
    reference = {(case["seq_len"], case["pass"]): rounds
                 for case, rounds in zip(cases, results) if case["mechanism"] == REFERENCE}
    rows = []
    for case, rounds in zip(cases, results):
        if rounds:
            ratios, method = ratios_to_reference(case, rounds, reference.get((case["seq_len"], case["pass"])))
            rows.append(make_row(case, combine(rounds), ratios, method))
    return rows


def time_growth(cases: list[dict[str, Any]], results: list[list[dict[str, Any]]]) -> list[str]:
    """Per mechanism and pass, t(longest) / t(shortest) of the lengths that ran ok (median of per-round
    ratios) and the exponent it implies: 1 for linear time, 2 for quadratic."""
    lines = []
    groups: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for case, rounds in zip(cases, results):
        if rounds and combine(rounds)["status"] == "ok":
            groups.setdefault((case["mechanism"], case["pass"]), {})[case["seq_len"]] = rounds
    for (mechanism, pass_name), by_length in groups.items():
        if len(by_length) < 2:
            continue
        shortest, longest = min(by_length), max(by_length)
        ratio = median_ratio(by_length[longest], by_length[shortest])
        if ratio:
            exponent = math.log(ratio) / math.log(longest / shortest)
            lines.append(f"  {mechanism:<14} {pass_name:<17} t({longest})/t({shortest}) = {ratio:.2f}  (n^{exponent:.2f})")
    return lines


def print_table(rows: list[KernelRow]) -> None:
    import pandas as pd

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = pd.DataFrame([{
        "mechanism": r.mechanism, "seq_len": r.seq_len, "pass": r.pass_, "time_ms": ms(r.time_ms),
        "min-max_ms": "-" if r.time_ms is None else f"{r.time_ms_min:.1f}-{r.time_ms_max:.1f}",
        "vs_sdpa": "-" if r.time_ratio_to_reference is None
        else f"{r.time_ratio_to_reference:.3f}{'*' if r.ratio_method == 'rounds' else ''}",
        "peak_MiB": "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.2f}",
        "GFLOP/s": "-" if r.gflops_per_second is None else f"{r.gflops_per_second:.2f}", "status": r.status,
    } for r in rows])
    print(table.to_string(index=False))


def crossover(lengths: list[int], ratios: list[float | None], baseline: str) -> str:
    """First length from which mechanism/baseline stays < 1, interpolated in log-log space.

    ratios[i] is None where the baseline failed (oom, timeout) but the mechanism succeeded: the
    mechanism is then cheaper by definition, but there is no value to interpolate with.
    """
    if not lengths:
        return "no data"
    last_not_cheaper = max((i for i, r in enumerate(ratios) if r is not None and r >= 1), default=None)
    if last_not_cheaper is None:
        return "below smallest length"
    if last_not_cheaper == len(lengths) - 1:
        return "never"
    i = last_not_cheaper
    n0, n1, r0, r1 = lengths[i], lengths[i + 1], ratios[i], ratios[i + 1]
    if r1 is None:
        return f"<= {n1} ({baseline} failed there)"
    t = math.log(r0) / (math.log(r0) - math.log(r1)) if r0 != r1 else 0.0
    return str(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))))


METRICS = {"time": "time_ms", "memory": "peak_memory_bytes"}


def crossovers(rows: list[KernelRow]) -> list[CrossoverRow]:
    """One row per (mechanism other than the baseline, pass, metric): where it becomes cheaper than the baseline."""
    baseline = baseline_name()

    def values(mechanism: str, pass_name: str, column: str) -> dict[int, float | None]:
        return {r.seq_len: (getattr(r, column) if r.status == "ok" else None)
                for r in rows if r.mechanism == mechanism and r.pass_ == pass_name}

    out: list[CrossoverRow] = []
    mechanisms = list(dict.fromkeys(r.mechanism for r in rows))
    if baseline not in mechanisms:
        return out
    for pass_name in dict.fromkeys(r.pass_ for r in rows):
        for mechanism in (m for m in mechanisms if m != baseline):
            for metric, column in METRICS.items():
                base, mine = values(baseline, pass_name, column), values(mechanism, pass_name, column)
                lengths, ratios = [], []
                for n in sorted(mine):
                    if mine[n] is None or n not in base:
                        continue
                    lengths.append(n)
                    if base[n] is None:
                        ratios.append(None)
                    elif base[n] > 0 and mine[n] > 0:
                        ratios.append(mine[n] / base[n])
                    else:  # a zero measurement: compare directly, no log-space interpolation needed
                        ratios.append(2.0 if mine[n] >= base[n] else 0.5)
                out.append(CrossoverRow(mechanism=mechanism, **{"pass": pass_name}, metric=metric,
                                        crossover_seq_len=crossover(lengths, ratios, baseline)))
    return out


def plot(rows: list[KernelRow], out_dir: Path) -> None:
    records = [{**r.model_dump(by_alias=True)} for r in rows if r.status == "ok"]
    for panel, filename in ((Panel("time_ms", "median time (ms)"), "kernels_time.png"),
                            (Panel("peak_memory_bytes", "peak memory (MiB)", 2**20), "kernels_memory.png")):
        fig = loglog_figure(records, "seq_len", [panel], line="mechanism", facet="pass",
                            xlabel="sequence length n", dashed=(REFERENCE,))
        if fig is not None:
            save_png(fig, out_dir / filename, dpi=120)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cases = build_cases(args)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    first = cases[0]
    print(f"tcompare bench kernels: {len(cases)} cases x {args.repeats} rounds on {first['device']} ({first['threads']} "
          f"threads), batch {first['batch']}, heads {first['heads']}, head_dim {first['head_dim']}, {first['dtype']}, "
          f"{'causal' if first['causal'] else 'non-causal'}, position {first['position_embedding']}", file=sys.stderr)
    results: list[list[dict[str, Any]]] = [[] for _ in cases]
    by_length = sorted(range(len(cases)), key=lambda i: cases[i]["seq_len"])  # stable: each mechanism's lengths ascend
    failed_at: dict[tuple[str, str], tuple[int, str]] = {}
    with tqdm(total=len(cases) * args.repeats, desc="bench kernels", unit="case", file=sys.stderr) as progress:
        for _ in range(args.repeats):
            for i in by_length:
                case, rounds = cases[i], results[i]
                progress.update(1)
                if rounds and rounds[-1]["status"] != "ok":
                    continue  # failed, refused or skipped: not run again
                key, n = (case["mechanism"], case["pass"]), case["seq_len"]
                if case["refused"]:
                    result = {"status": f"refused: {case['refused']}"}
                elif key in failed_at and failed_at[key][0] < n and not args.keep_going:
                    result = {"status": f"skipped ({failed_at[key][1]})"}
                else:
                    result = run_child("transformer_comparison.bench.kernel_case", case, RESULT_PREFIX, args.timeout)
                    if result["status"] in FAILED_STATUSES:
                        failed_at.setdefault(key, (n, f"{result['status']} at n={n}"))
                rounds.append(result)
                write_csv(out_dir / "kernels.csv", summarise(cases, results), KernelRow)

    rows = summarise(cases, results)
    print_table(rows)
    if any(row.ratio_method in ("paired", "rounds") for row in rows):
        print("vs_sdpa: time / torch_sdpa's, median over rounds; each round times the kernel and torch_sdpa alternately "
              "in the kernel's process (* where that was not possible: against torch_sdpa's own case in the round)")
    plot(rows, out_dir)
    cross = crossovers(rows)
    write_csv(out_dir / "kernels_crossover.csv", cross, CrossoverRow)
    if cross:
        print(f"\ncrossover with {baseline_name()} (length from which the mechanism is cheaper):")
        for row in cross:
            print(f"  {row.mechanism:<14} {row.pass_:<17} {row.metric:<7} {row.crossover_seq_len}")
    growth = time_growth(cases, results)
    if growth:
        print("\ntime growth from the shortest to the longest length (median of per-round ratios):")
        print("\n".join(growth))
    print(f"\nwrote {out_dir / 'kernels.csv'}, kernels_crossover.csv, kernels_time.png, kernels_memory.png")
    return 0
