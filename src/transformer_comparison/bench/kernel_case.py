"""One case of `tcompare bench kernels`, run in its own process:
`python -m transformer_comparison.bench.kernel_case --case JSON` prints one result line.

Inside the case: inputs are made with a fixed seed (q, k, v, the cotangent, and the extra inputs of a
mechanism that owns projections of the layer input, made by its own `layer_inputs` module from a
random layer input and then held fixed), the pass runs at a small length to warm up, then once at
full length under the memory measurement (`bench/memory.py`), then `torch.utils.benchmark.Timer`
with `num_threads` set explicitly times it.

When the run compares with torch's SDPA (`case["pair_with"]`), the case times its kernel and SDPA
alternately in this process, a block of calls each, A B A B (`time_paired`): the machine's speed
drifts over seconds, and a pair of blocks a few hundred milliseconds apart sees the same machine, so
the median of the per-pair ratios is what the kernel costs against SDPA, drift cancelled. The
kernel's time is the median over its blocks. Without a reference (or when SDPA cannot run the case,
out of memory or over `pair_budget_s`), `blocked_autorange` times the kernel alone (median).
"""

from __future__ import annotations

import statistics
import sys
import timeit
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_comparison.attention import build_attention
from transformer_comparison.attention.bias import clear_bias_cache, offsets, position_bias
from transformer_comparison.bench.common import child_main
from transformer_comparison.numerics import prepare_process
from transformer_comparison.position import build_position
from transformer_comparison.resources import is_out_of_memory

REFERENCE = "torch_sdpa"  # torch.nn.functional.scaled_dot_product_attention
RESULT_PREFIX = "TCOMPARE_CASE_RESULT "
MIN_PAIRS = 3  # paired blocks of kernel and reference, at least
BLOCK_SECONDS = 0.05  # a block repeats the call until it takes about this long
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def reference_sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, alibi_slopes: Tensor | None = None, rope: Any = None
) -> Tensor:
    """torch's scaled_dot_product_attention with the kernel signature; grouped K/V via enable_gqa.

    RoPE rotates q and k first. ALiBi becomes the dense (heads, nq, nk) bias of `bias.position_bias`,
    the way SDPA takes a bias, so SDPA then runs its masked path rather than its causal flash one.
    Queries are end-aligned with the keys like every kernel's; SDPA's is_causal aligns them at the
    start, so causal attention with nq < nk also goes through the mask.
    """
    if rope is not None:
        q, k = rope.rotate_qk(q, k)
    nq, nk = q.shape[2], k.shape[2]
    mask = None
    if alibi_slopes is not None or (causal and nq != nk):
        positions = torch.arange(nk, device=q.device)
        slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=q.dtype)[:, None, None]
        mask = position_bias(offsets(positions[nk - nq:], positions), causal=causal, slopes=slopes, dtype=q.dtype)
        causal = False
    grouped = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)


def make_inputs(case: dict[str, Any], n: int, attn: Any) -> tuple[list[Tensor], dict[str, Tensor]]:
    """q, k, v (and the cotangent for forward_backward), and the mechanism's extra inputs, seeded."""
    device, dtype = torch.device(case["device"]), DTYPES[case["dtype"]]
    backward = case["pass"] == "forward_backward"
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, kv, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    shapes = [(b, h, n, d), (b, kv, n, d), (b, kv, n, d)] + ([(b, h, n, d)] if backward else [])
    tensors = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for shape in shapes]
    for t in tensors[:3]:
        t.requires_grad_(backward)
    extra: dict[str, Tensor] = {}
    module = None if attn is reference_sdpa else attn.layer_inputs(h * d, h, d)
    if module is not None:
        torch.manual_seed(0)
        x = torch.randn(b, n, h * d, generator=g).to(device=device, dtype=dtype)
        with torch.no_grad():
            extra = {key: t.detach().requires_grad_(backward) for key, t in module.to(device, dtype)(x).items()}
    return tensors, extra


def make_step(attn: Callable[..., Tensor], inputs: list[Tensor], extra: dict[str, Tensor], causal: bool,
              pass_name: str, position: dict[str, Any]) -> Callable[[], Any]:
    """One execution of the pass: forward under no_grad, or forward + grads of q, k, v (and the extras)."""
    q, k, v = inputs[:3]
    if pass_name == "forward":
        def step() -> Any:
            with torch.no_grad():
                return attn(q, k, v, causal=causal, **position, **extra)
        return step
    grad_out = inputs[3]
    wrt = (q, k, v, *extra.values())

    def step() -> Any:
        out = attn(q, k, v, causal=causal, **position, **extra)
        return torch.autograd.grad(out, wrt, grad_out)
    return step


def kernel_positions(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    encoding = build_position(case["position_embedding"], **case["position_options"])
    positions = encoding.kernel_positions(case["heads"], case["seq_len"])
    slopes = None if positions.alibi_slopes is None else positions.alibi_slopes.to(device)
    return {"rope": positions.rope, "alibi_slopes": slopes}


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Warm up, measure peak memory of one execution, then time it. Runs in the case's own process."""
    from torch.utils import benchmark

    from transformer_comparison.bench.memory import available_memory_bytes, limit_address_space, measure_peak

    torch.set_num_threads(case["threads"])
    prepare_process()
    clear_bias_cache()  # as in a fresh process: the case's own bias counts in its memory
    device = torch.device(case["device"])
    name = case["mechanism"]
    attn = reference_sdpa if name == REFERENCE else build_attention(name, **case["options"])
    position = kernel_positions(case, device)
    warm, warm_extra = make_inputs(case, min(case["seq_len"], 64), attn)
    warm_step = make_step(attn, warm, warm_extra, case["causal"], case["pass"], position)
    warm_step()
    measure_peak(warm_step, device, track=warm)  # also starts up the profiler once, outside the measurement
    del warm, warm_step, warm_extra
    limit = case["memory_limit"]
    if device.type == "cpu" and limit is not None:
        extra_bytes = available_memory_bytes() if limit == "auto" else int(limit * 2**30)
        if extra_bytes:
            limit_address_space(int(extra_bytes * 0.9) if limit == "auto" else extra_bytes)

    inputs, extra = make_inputs(case, case["seq_len"], attn)
    step = make_step(attn, inputs, extra, case["causal"], case["pass"], position)
    peak = measure_peak(step, device, track=inputs + list(extra.values()))
    result = {"status": "ok", "peak_memory_bytes": peak.bytes, "peak_rss_delta_bytes": peak.rss_bytes,
              "memory_method": peak.method, "paired_ratio": None}
    paired = _time_beside_reference(case, step, position) if case.get("pair_with") is not None else None
    if paired is not None:
        time_s, result["paired_ratio"] = paired
        return {**result, "time_ms": time_s * 1e3}
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=case["threads"])
    return {**result, "time_ms": timer.blocked_autorange(min_run_time=case["min_run_time"]).median * 1e3}


def _time_beside_reference(
    case: dict[str, Any], step: Callable[[], Any], position: dict[str, Any],
) -> tuple[float, float] | None:
    """`time_paired` against torch's SDPA on the reference's own inputs at the case's length (its kv heads,
    no extras); None when SDPA cannot run beside the kernel (its inputs or its call out of memory, or too slow)."""
    reference_case = {**case, "kv_heads": case["pair_with"]["kv_heads"]}
    try:
        inputs, _ = make_inputs(reference_case, case["seq_len"], reference_sdpa)
    except Exception as error:
        if is_out_of_memory(error):
            return None
        raise
    reference = make_step(reference_sdpa, inputs, {}, case["causal"], case["pass"], position)
    return time_paired(step, reference, case["min_run_time"], case["pair_budget_s"])


def time_paired(
    step: Callable[[], Any], reference: Callable[[], Any], min_run_time: float, budget_s: float,
    clock: Callable[[], float] | None = None,
) -> tuple[float, float] | None:
    """(seconds per call of step, median over pairs of step / reference), timed in blocks alternately,
    A B A B, until there are MIN_PAIRS pairs and step has run min_run_time seconds. None when the
    reference runs out of memory, or when MIN_PAIRS single calls of both would exceed budget_s.

    Blocks are the standard library's `timeit` (garbage collection off) on torch's clock, which
    synchronises CUDA; step has already run at full length (the memory measurement)."""
    if clock is None:
        # imported here, in the case's process: torch.utils.benchmark loads cpp_extension (0.36 s), which
        # logs "No CUDA runtime is found" into every command's output on a CUDA build of torch without a GPU
        from torch.utils.benchmark.utils.timer import timer as clock
    timers = [timeit.Timer(fn, timer=clock) for fn in (step, reference)]
    try:
        singles = [timer.timeit(1) for timer in timers]  # the reference's first call at this length
    except Exception as error:
        if is_out_of_memory(error):
            return None
        raise
    if MIN_PAIRS * sum(singles) > budget_s:
        return None
    numbers = [max(1, round(BLOCK_SECONDS / max(single, 1e-9))) for single in singles]
    step_times: list[float] = []
    ratios: list[float] = []
    while len(ratios) < MIN_PAIRS or sum(step_times) * numbers[0] < min_run_time:
        mine = timers[0].timeit(numbers[0]) / numbers[0]
        theirs = timers[1].timeit(numbers[1]) / numbers[1]
        step_times.append(mine)
        ratios.append(mine / theirs)
    return statistics.median(step_times), statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    return child_main("run one kernel benchmark case (used by tcompare bench kernels)", RESULT_PREFIX, measure_case, argv)


if __name__ == "__main__":
    sys.exit(main())
