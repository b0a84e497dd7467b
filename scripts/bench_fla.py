"""Forward + backward time of the delta-rule kernels against flash-linear-attention's pure-torch
chunk forms, on this machine, in one run (issue 13: "measure each against fla's reference ops").

    pip install --no-deps fla-core==0.6.0 einops      # requirements-reference.txt; no Triton needed
    python scripts/bench_fla.py [--lengths 1024,4096] [--threads 1] [--chunk_size 64] [--out results/bench-fla]

fla's `fla/ops/*/naive.py` files are loaded on their own (importing `fla` needs Triton), as the
tests do. Both sides get the same inputs and the same work: L2-normalised q and k (inside our
kernel, before fla's op), write strengths beta (and a log decay for the gated rule), chunk size
`--chunk_size`, no output norm. Times are medians of torch.utils.benchmark's blocked_autorange.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils import benchmark

from transformer_comparison.attention import build_attention
from transformer_comparison.numerics import flush_subnormals


def load_fla(relative_path: str):
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fla-core is not installed: pip install --no-deps -r requirements-reference.txt")
    path = Path(spec.submodule_search_locations[0]) / "ops" / relative_path
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def inputs(n: int, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (1, heads, n, head_dim)
    tensors = {name: torch.randn(shape, generator=g) for name in ("q", "k", "v")}
    tensors["beta"] = torch.rand(1, heads, n, generator=g)
    tensors["log_decay"] = -F.softplus(torch.randn(1, heads, n, generator=g)) / 8
    return {name: t.requires_grad_() for name, t in tensors.items()}


def cases(chunk: int) -> dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    delta, gated = load_fla("delta_rule/naive.py"), load_fla("gated_delta_rule/naive.py")
    ours_delta = build_attention("deltanet", chunk_size=chunk, output_norm=False)
    ours_gated = build_attention("gated_deltanet", chunk_size=chunk, output_norm=False)

    def fla_delta(x):
        qn, kn = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
        return delta.delta_rule_chunkwise(qn, kn, x["v"], x["beta"], chunk_size=chunk)[0]

    def fla_gated(x):  # fla's layout is (B, T, H, d)
        qn, kn = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
        q, k, v, beta, g = (t.transpose(1, 2) for t in (qn, kn, x["v"], x["beta"], x["log_decay"]))
        return gated.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk)[0].transpose(1, 2)

    return {
        "deltanet (ours)": lambda x: ours_delta(x["q"], x["k"], x["v"], beta=x["beta"]),
        "delta_rule_chunkwise (fla)": fla_delta,
        "gated_deltanet (ours)": lambda x: ours_gated(x["q"], x["k"], x["v"], beta=x["beta"], log_decay=x["log_decay"]),
        "naive_chunk_gated_delta_rule (fla)": fla_gated,
    }


def forward_backward_ms(fn: Callable, x: dict[str, torch.Tensor], threads: int) -> float:
    grad = torch.randn_like(x["v"])
    wrt = list(x.values())

    def step():
        return torch.autograd.grad(fn(x), wrt, grad, allow_unused=True)

    step()
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/bench-fla"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush_subnormals()
    rows = []
    for n in (int(v) for v in args.lengths.split(",")):
        x = inputs(n, args.heads, args.head_dim)
        for name, fn in cases(args.chunk_size).items():
            rows.append({"kernel": name, "seq_len": n, "forward_backward_ms": round(forward_backward_ms(fn, x, args.threads), 2)})
            print(f"{name:36s} n={n:5d} {rows[-1]['forward_backward_ms']:9.2f} ms", flush=True)
    table = pd.DataFrame(rows).pivot(index="kernel", columns="seq_len", values="forward_backward_ms")
    print(table.to_string())
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "fla_bench.csv", index=False)
    print(f"wrote {args.out / 'fla_bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
