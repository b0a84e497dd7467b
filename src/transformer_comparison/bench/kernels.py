"""`tcompare bench kernels`: time and peak memory of each attention kernel against sequence length.

Every case (mechanism, seq_len, pass) runs in a fresh Python process
(`python -m transformer_comparison.bench.kernels --case JSON`), which isolates out-of-memory and
lets a per-case timeout kill it; a failing case is recorded with its status, never raised. Inside
the case: inputs are made, the pass runs at a small length to warm up, then once at full length
under the memory measurement (`bench/memory.py`), then `torch.utils.benchmark.Timer` with
`num_threads` set explicitly times it (`blocked_autorange`, median). docs/benchmarks.md has the
method, the FLOP model and how to read the outputs:

    DIR/kernels.csv  kernels_crossover.csv  kernels_time.png  kernels_memory.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_comparison.attention import build_attention, kernel_options
from transformer_comparison.attention.registry import registered_names
from transformer_comparison.errors import UserError
from transformer_comparison.numerics import flush_subnormals
from transformer_comparison.position import POSITION_TYPES, alibi_bias, kernel_position_args

BASELINE = "dot_product"
REFERENCE = "torch_sdpa"  # torch.nn.functional.scaled_dot_product_attention
PASSES = ("forward", "forward_backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# build_attention options settable from the command line; each goes only to the mechanisms that take it
OPTION_FLAGS = ("window", "top_k", "block_size")
CSV_COLUMNS = ("mechanism", "seq_len", "pass", "time_ms", "peak_memory_bytes", "status")
EXTRA_COLUMNS = (
    "gflops_per_second", "peak_rss_delta_bytes", "memory_method", "position_embedding", "batch", "heads",
    "kv_heads", "head_dim", "causal", "dtype", "device", "threads", "options",
)
RESULT_PREFIX = "TCOMPARE_CASE_RESULT "
FAILED_STATUSES = ("oom", "timeout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="comma-separated sequence lengths (default: %(default)s)")
    parser.add_argument("--mechanisms", default=None,
                        help=f"comma-separated mechanisms (default: every registered one and {REFERENCE})")
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated passes (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=None,
                        help="key/value heads for every mechanism (default: heads, and heads // 4 for gqa)")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal masking (default: on)")
    parser.add_argument("--position_embedding", default="sinusoidal",
                        help="what each kernel receives (position.kernel_position_args): sinusoidal (nothing: it is "
                             "added to the embeddings), rope (q and k rotated) or alibi (a bias per head); torch_sdpa "
                             "gets q and k rotated before it, or ALiBi as a dense n x n mask (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for each case (default: torch's default, what training would use)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is killed (default: %(default)s)")
    parser.add_argument("--min_run_time", type=float, default=1.0, help="seconds of timed runs per case (default: %(default)s)")
    parser.add_argument("--memory_limit", default="auto",
                        help="GiB a CPU case may allocate before it fails as oom: a number, 'auto' (90%% of available "
                             "memory when the case starts) or 'none'")
    parser.add_argument("--keep_going", action="store_true",
                        help="also run lengths above one that ran out of memory or time (default: record them as skipped)")
    parser.add_argument("--window", type=int, default=None, help="window for mechanisms that take one (local)")
    parser.add_argument("--top_k", type=int, default=None, help="top_k for mechanisms that take one (sparse)")
    parser.add_argument("--block_size", type=int, default=None, help="block_size for mechanisms that take one")
    parser.add_argument("--out", default="results/bench", help="output directory (default: %(default)s)")


# --------------------------------------------------------------------------- validation


def parse_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def parse_positive_ints(text: str, what: str, example: str) -> list[int]:
    """'512,1024' for option --`what` -> sorted distinct integers >= 1, or a one-line UserError."""
    values = []
    for item in parse_list(text, what):
        try:
            value = int(item)
        except ValueError:
            raise UserError(f"--{what}: {item!r} is not an integer; give e.g. --{what} {example}") from None
        if value < 1:
            raise UserError(f"--{what}: {value} must be >= 1")
        values.append(value)
    return sorted(values)


def parse_lengths(text: str) -> list[int]:
    return parse_positive_ints(text, "lengths", "512,1024")


def valid_mechanisms() -> list[str]:
    return [*registered_names(), REFERENCE]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available (use --device cpu)")
    return name


def default_kv_heads(mechanism: str, heads: int) -> int:
    """gqa: the largest divisor of heads that is <= heads // 4 (at least 1); others: heads."""
    if mechanism != "gqa":
        return heads
    return max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)


def mechanism_options(mechanism: str, args: argparse.Namespace, kv_heads: int) -> dict[str, Any]:
    """The command-line options this mechanism's constructor takes."""
    if mechanism == REFERENCE:
        return {}
    accepted = kernel_options(mechanism)
    given = {key: getattr(args, key) for key in OPTION_FLAGS if getattr(args, key) is not None}
    if "kv_heads" in accepted:
        given["kv_heads"] = kv_heads
    return {key: value for key, value in given.items() if key in accepted}


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


def build_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate the command line and return one JSON-able case per (mechanism, pass, seq_len)."""
    lengths = parse_lengths(args.lengths)
    valid = valid_mechanisms()
    mechanisms = parse_list(args.mechanisms, "mechanisms") if args.mechanisms else valid
    unknown = [m for m in mechanisms if m not in valid]
    if unknown:
        raise UserError(f"unknown mechanism {', '.join(unknown)}; valid: {', '.join(valid)}")
    passes = parse_list(args.passes, "passes")
    if any(p not in PASSES for p in passes):
        raise UserError(f"--passes {args.passes!r}: each must be one of {', '.join(PASSES)}")
    if args.position_embedding not in POSITION_TYPES:
        raise UserError(f"--position_embedding {args.position_embedding!r} is not one of {', '.join(POSITION_TYPES)}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    for name in ("batch", "heads", "head_dim", "threads", "kv_heads", *OPTION_FLAGS):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        raise UserError(f"--kv_heads {args.kv_heads} must divide --heads {args.heads}")
    if args.timeout <= 0 or args.min_run_time <= 0:
        raise UserError("--timeout and --min_run_time must be > 0 seconds")
    memory_limit = parse_memory_limit(args.memory_limit)
    device = resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()

    cases = []
    for mechanism in mechanisms:
        kv_heads = args.kv_heads or default_kv_heads(mechanism, args.heads)
        options = mechanism_options(mechanism, args, kv_heads)
        resolved: dict[str, Any] = {}
        if mechanism != REFERENCE:
            try:
                resolved = dict(vars(build_attention(mechanism, **options)))
            except (TypeError, ValueError) as error:
                raise UserError(f"{mechanism}: {error}") from None
        for pass_name in passes:
            for n in lengths:
                cases.append({
                    "mechanism": mechanism, "seq_len": n, "pass": pass_name, "batch": args.batch, "heads": args.heads,
                    "kv_heads": kv_heads, "head_dim": args.head_dim, "causal": args.causal, "dtype": args.dtype,
                    "position_embedding": args.position_embedding,
                    "device": device, "threads": threads, "min_run_time": args.min_run_time,
                    "memory_limit": memory_limit, "options": options,
                    "resolved_options": {k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))},
                })
    return cases


# --------------------------------------------------------------------------- one case (child process)


def reference_sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, alibi_slopes: Tensor | None = None, rope: Any = None
) -> Tensor:
    """torch's scaled_dot_product_attention with the kernel signature; grouped K/V via enable_gqa.

    RoPE rotates q and k first. ALiBi becomes a dense (heads, nq, nk) additive mask, the way SDPA
    takes a bias, so SDPA then runs its masked path rather than its causal flash one. Queries are
    end-aligned with the keys like every kernel's; SDPA's is_causal aligns them at the start, so
    causal attention with nq < nk also goes through the mask.
    """
    if rope is not None:
        q, k = rope.rotate_qk(q, k)
    nq, nk = q.shape[2], k.shape[2]
    mask = None
    if alibi_slopes is not None:
        positions = torch.arange(nk, device=q.device)
        mask = alibi_bias(alibi_slopes.to(device=q.device, dtype=q.dtype), positions[nk - nq:], positions)
    if causal and (mask is not None or nq != nk):
        hidden = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(nk - nq + 1)
        mask = (q.new_zeros(nq, nk) if mask is None else mask).masked_fill(hidden, float("-inf"))
        causal = False
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    except TypeError:  # torch < 2.5: repeat K/V heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def make_inputs(case: dict[str, Any], n: int) -> list[Tensor]:
    """q, k, v (and the cotangent for forward_backward) with a fixed seed."""
    device, dtype = torch.device(case["device"]), DTYPES[case["dtype"]]
    backward = case["pass"] == "forward_backward"
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, kv, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    shapes = [(b, h, n, d), (b, kv, n, d), (b, kv, n, d)] + ([(b, h, n, d)] if backward else [])
    tensors = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for shape in shapes]
    for t in tensors[:3]:
        t.requires_grad_(backward)
    return tensors


def make_step(
    attn: Callable[..., Tensor], inputs: list[Tensor], causal: bool, pass_name: str, position: dict[str, Any] | None = None
) -> Callable[[], Any]:
    """One execution of the pass: forward under no_grad, or forward + grads of q, k, v for a fixed cotangent.

    position: the kernel's position arguments, {"rope": ..., "alibi_slopes": ...} (none by default).
    """
    q, k, v = inputs[:3]
    position = position or {}
    if pass_name == "forward":
        def step() -> Any:
            with torch.no_grad():
                return attn(q, k, v, causal=causal, **position)
    else:
        grad_out = inputs[3]

        def step() -> Any:
            out = attn(q, k, v, causal=causal, **position)
            return torch.autograd.grad(out, (q, k, v), grad_out)
    return step


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Warm up, measure peak memory of one execution, then time it. Runs in the case's own process."""
    from torch.utils import benchmark

    from transformer_comparison.bench.memory import available_memory_bytes, limit_address_space, measure_peak

    torch.set_num_threads(case["threads"])
    flush_subnormals()
    device = torch.device(case["device"])
    name = case["mechanism"]
    attn = reference_sdpa if name == REFERENCE else build_attention(name, **case["options"])
    position = kernel_position_args(case["position_embedding"], case["heads"])
    if position["alibi_slopes"] is not None:
        position["alibi_slopes"] = position["alibi_slopes"].to(device)
    warm = make_inputs(case, min(case["seq_len"], 64))
    warm_step = make_step(attn, warm, case["causal"], case["pass"], position)
    warm_step()
    measure_peak(warm_step, device, track=warm)  # also starts up the profiler once, outside the measurement
    del warm, warm_step
    limit = case["memory_limit"]
    if device.type == "cpu" and limit is not None:
        extra = available_memory_bytes() if limit == "auto" else int(limit * 2**30)
        if extra:
            limit_address_space(int(extra * 0.9) if limit == "auto" else extra)

    inputs = make_inputs(case, case["seq_len"])
    step = make_step(attn, inputs, case["causal"], case["pass"], position)
    peak = measure_peak(step, device, track=inputs)
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=case["threads"])
    measurement = timer.blocked_autorange(min_run_time=case["min_run_time"])
    return {"status": "ok", "time_ms": measurement.median * 1e3, "peak_memory_bytes": peak.bytes,
            "peak_rss_delta_bytes": peak.rss_bytes, "memory_method": peak.method}


def error_status(error: BaseException) -> str:
    """'oom' for allocation failures, else the error as one line."""
    message = str(error)
    lowered = message.lower()
    if isinstance(error, MemoryError) or "out of memory" in lowered or "can't allocate memory" in lowered:
        return "oom"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}"[:300]


def case_main(argv: list[str] | None = None) -> int:
    """`python -m transformer_comparison.bench.kernels --case JSON`: print one result line."""
    parser = argparse.ArgumentParser(description="run one kernel benchmark case (used by tcompare bench kernels)")
    parser.add_argument("--case", required=True, help="the case as JSON")
    case = json.loads(parser.parse_args(argv).case)
    try:
        result = measure_case(case)
    except Exception as error:  # recorded, never raised: the parent reads the status
        result = {"status": error_status(error)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def run_case(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh process; classify a timeout, a kill or a crash into its status."""
    command = [sys.executable, "-m", "transformer_comparison.bench.kernels", "--case", json.dumps(case)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom"}  # the kernel's OOM killer
    if proc.returncode < 0:
        return {"status": f"killed by signal {signal.Signals(-proc.returncode).name}"}
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return {"status": (lines[-1] if lines else f"exit status {proc.returncode}")[:300]}


def attention_flops(case: dict[str, Any]) -> float | None:
    """FLOPs of one pass under the per-mechanism model in docs/benchmarks.md; None if unmodelled."""
    n, d, causal = case["seq_len"], case["head_dim"], case["causal"]
    bh = case["batch"] * case["heads"]
    options = case["resolved_options"]

    def pairs(width: int) -> float:  # (query, key) pairs with 0 <= i - j < width (both sides if not causal)
        m = min(width, n)
        one_sided = m * (m + 1) / 2 + (n - m) * width
        return one_sided if causal else 2 * one_sided - n

    name = case["mechanism"]
    if name in (BASELINE, REFERENCE, "gqa", "flash"):
        forward = 4 * bh * d * pairs(n)
    elif name == "local" and isinstance(options.get("window"), int):
        forward = 4 * bh * d * pairs(options["window"])
    elif name == "sparse" and isinstance(options.get("top_k"), int):
        forward = 2 * bh * d * pairs(n) + 2 * bh * d * pairs(options["top_k"])
    elif name == "linear":
        forward = 4 * bh * n * d * d
    else:
        return None
    return forward * (3 if case["pass"] == "forward_backward" else 1)


def make_row(case: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    time_ms = result.get("time_ms")
    flops = attention_flops(case)
    return {
        "mechanism": case["mechanism"], "seq_len": case["seq_len"], "pass": case["pass"], "time_ms": time_ms,
        "peak_memory_bytes": result.get("peak_memory_bytes"), "status": result["status"],
        "gflops_per_second": flops / (time_ms * 1e-3) / 1e9 if flops and time_ms else None,
        "peak_rss_delta_bytes": result.get("peak_rss_delta_bytes"), "memory_method": result.get("memory_method"),
        "position_embedding": case["position_embedding"],
        **{key: case[key] for key in ("batch", "heads", "kv_heads", "head_dim", "causal", "dtype", "device", "threads")},
        "options": " ".join(f"{k}={v}" for k, v in case["resolved_options"].items()),
    }


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Iterable[str]) -> None:
    columns = list(columns)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([format_value(row.get(column)) for column in columns])
    tmp.replace(path)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["mechanism", "seq_len", "pass", "time_ms", "peak_MiB", "GFLOP/s", "status"]
    lines = [header]
    for row in rows:
        memory = row["peak_memory_bytes"]
        lines.append([
            row["mechanism"], str(row["seq_len"]), row["pass"],
            f"{row['time_ms']:.3f}" if row["time_ms"] is not None else "-",
            f"{memory / 2**20:.2f}" if memory is not None else "-",
            f"{row['gflops_per_second']:.2f}" if row["gflops_per_second"] is not None else "-",
            row["status"],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {1, 3, 4, 5}
    for line in lines:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())


METRICS = {"time": "time_ms", "memory": "peak_memory_bytes"}


def crossover(lengths: list[int], ratios: list[float | None]) -> str:
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
        return f"<= {n1} ({BASELINE} failed there)"
    t = math.log(r0) / (math.log(r0) - math.log(r1)) if r0 != r1 else 0.0
    return str(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))))


def crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mechanism other than the baseline, pass, metric): where it becomes cheaper than dot_product."""
    def values(mechanism: str, pass_name: str, column: str) -> dict[int, float | None]:
        return {r["seq_len"]: (r[column] if r["status"] == "ok" else None)
                for r in rows if r["mechanism"] == mechanism and r["pass"] == pass_name}

    out = []
    mechanisms = list(dict.fromkeys(r["mechanism"] for r in rows))
    if BASELINE not in mechanisms:
        return out
    for pass_name in dict.fromkeys(r["pass"] for r in rows):
        for mechanism in (m for m in mechanisms if m != BASELINE):
            for metric, column in METRICS.items():
                base, mine = values(BASELINE, pass_name, column), values(mechanism, pass_name, column)
                lengths, ratios = [], []
                for n in sorted(mine):
                    if mine[n] is None or n not in base:
                        continue
                    if base[n] is None:
                        lengths.append(n)
                        ratios.append(None)
                    elif base[n] > 0 and mine[n] > 0:
                        lengths.append(n)
                        ratios.append(mine[n] / base[n])
                    else:  # a zero measurement: compare directly, no log-space interpolation needed
                        lengths.append(n)
                        ratios.append(2.0 if mine[n] >= base[n] else 0.5)
                out.append({"mechanism": mechanism, "pass": pass_name, "metric": metric,
                            "crossover_seq_len": crossover(lengths, ratios)})
    return out


def plot(rows: list[dict[str, Any]], column: str, ylabel: str, path: Path, scale: float = 1.0) -> None:
    """Log-log plot of `column` against seq_len, one line per mechanism, one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for ax, pass_name in zip(axes[0], passes):
        for mechanism in dict.fromkeys(r["mechanism"] for r in rows):
            points = sorted((r["seq_len"], r[column] * scale) for r in rows
                            if r["mechanism"] == mechanism and r["pass"] == pass_name
                            and r["status"] == "ok" and r[column])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linestyle="--" if mechanism == REFERENCE else "-", label=mechanism)
        format_loglog(ax, sorted({r["seq_len"] for r in rows}), "sequence length n", ylabel, pass_name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_loglog(ax: Any, ticks: list[int], xlabel: str, ylabel: str, title: str) -> None:
    """The benchmarks' plot style: log2 x axis ticked at the measured points, log y, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cases = build_cases(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = cases[0]
    print(f"tcompare bench kernels: {len(cases)} cases on {first['device']} ({first['threads']} threads), "
          f"batch {first['batch']}, heads {first['heads']}, head_dim {first['head_dim']}, {first['dtype']}, "
          f"{'causal' if first['causal'] else 'non-causal'}, position {first['position_embedding']}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    failed_at: dict[tuple[str, str], str] = {}
    for case in tqdm(cases, desc="bench kernels", unit="case", file=sys.stderr):
        key = (case["mechanism"], case["pass"])
        if key in failed_at and not args.keep_going:
            result = {"status": f"skipped ({failed_at[key]})"}
        else:
            result = run_case(case, args.timeout)
            if result["status"] in FAILED_STATUSES:
                failed_at.setdefault(key, f"{result['status']} at n={case['seq_len']}")
        rows.append(make_row(case, result))
        write_csv(out_dir / "kernels.csv", rows, CSV_COLUMNS + EXTRA_COLUMNS)

    print_table(rows)
    plot(rows, "time_ms", "median time (ms)", out_dir / "kernels_time.png")
    plot(rows, "peak_memory_bytes", "peak memory (MiB)", out_dir / "kernels_memory.png", scale=1 / 2**20)
    cross = crossovers(rows)
    write_csv(out_dir / "kernels_crossover.csv", cross, ("mechanism", "pass", "metric", "crossover_seq_len"))
    if cross:
        print(f"\ncrossover with {BASELINE} (length from which the mechanism is cheaper):")
        for row in cross:
            print(f"  {row['mechanism']:<14} {row['pass']:<17} {row['metric']:<7} {row['crossover_seq_len']}")
    print(f"\nwrote {out_dir / 'kernels.csv'}, kernels_crossover.csv, kernels_time.png, kernels_memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(case_main())
