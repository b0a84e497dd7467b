"""`tcompare bench kernels`: end to end at tiny lengths, failure statuses, memory sanity, crossover maths."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import read_csv
from transformer_comparison.attention import build_attention
from transformer_comparison.artifacts.bench import KernelRow
from transformer_comparison.bench import kernel_case, kernels
from transformer_comparison.bench.common import run_child
from transformer_comparison.bench.memory import measure_peak, memtracker_peak
from transformer_comparison.cli import main
from transformer_comparison.position import Rotary, alibi_slopes

FAST = ["--min_run_time", "0.01", "--threads", "1", "--repeats", "1"]


@pytest.mark.slow
def test_end_to_end_writes_csv_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "kernels", "--lengths", "32,64", "--mechanisms", "dot_product", "--out", str(out), *FAST])
    assert rc == 0
    columns, rows = read_csv(out / "kernels.csv")
    assert columns[:6] == ["mechanism", "seq_len", "pass", "time_ms", "peak_memory_bytes", "status"]
    assert [(r["mechanism"], int(r["seq_len"]), r["pass"]) for r in rows] == [
        ("dot_product", 32, "forward"), ("dot_product", 64, "forward"),
        ("dot_product", 32, "forward_backward"), ("dot_product", 64, "forward_backward"),
    ]
    assert columns[-7:] == ["time_ms_min", "time_ms_max", "repeats", "time_ratio_to_reference", "round_times_ms",
                            "ratio_method", "round_ratios"]
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["time_ms"]) > 0
        assert int(row["peak_memory_bytes"]) > 0
        assert row["threads"] == "1" and row["kv_heads"] == "8" and row["device"] == "cpu"
    for name in ("kernels_time.png", "kernels_memory.png"):
        assert (out / name).stat().st_size > 0
    columns, _ = read_csv(out / "kernels_crossover.csv")
    assert columns == ["mechanism", "pass", "metric", "crossover_seq_len"]


@pytest.mark.slow
def test_rounds_report_the_median_its_range_and_the_ratio_to_sdpa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "kernels", "--lengths", "32", "--mechanisms", "torch_sdpa,dot_product", "--passes", "forward",
               "--out", str(out), "--min_run_time", "0.01", "--threads", "1", "--repeats", "2"])
    assert rc == 0
    _, rows = read_csv(out / "kernels.csv")
    assert [(r["mechanism"], int(r["seq_len"])) for r in rows] == [("torch_sdpa", 32), ("dot_product", 32)]
    assert [r["ratio_method"] for r in rows] == ["reference", "paired"]  # timed beside SDPA in its own process
    paired = [float(ratio) for ratio in rows[1]["round_ratios"].split()]
    assert len(paired) == 2 and all(ratio > 0 for ratio in paired)
    assert float(rows[1]["time_ratio_to_reference"]) == pytest.approx(sum(paired) / 2, abs=1e-3)  # median of two
    for row in rows:
        assert row["status"] == "ok" and row["repeats"] == "2"
        assert float(row["time_ms_min"]) <= float(row["time_ms"]) <= float(row["time_ms_max"])
        rounds = [float(t) for t in row["round_times_ms"].split()]
        assert len(rounds) == 2  # printed to the microsecond
        assert (min(rounds), max(rounds)) == pytest.approx((float(row["time_ms_min"]), float(row["time_ms_max"])), abs=1e-3)
    assert float(rows[0]["time_ratio_to_reference"]) == 1.0  # the reference against itself, round by round
    assert "vs_sdpa" in capsys.readouterr().out


def test_rounds_alternate_lengths_and_do_not_rerun_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round runs every case once, shortest lengths first; a case that failed is not run again, and
    longer lengths of its mechanism are skipped (without --keep_going)."""
    calls: list[tuple[str, int]] = []

    def fake_child(module: str, case: dict, prefix: str, timeout: float) -> dict:
        calls.append((case["mechanism"], case["seq_len"]))
        if case["mechanism"] == "dot_product" and case["seq_len"] == 64:
            return {"status": "timeout"}
        return {"status": "ok", "time_ms": float(case["seq_len"] * len(calls)), "peak_memory_bytes": 1}

    monkeypatch.setattr(kernels, "run_child", fake_child)
    out = tmp_path / "bench"
    assert main(["bench", "kernels", "--lengths", "32,64,128", "--mechanisms", "dot_product,torch_sdpa", "--passes",
                 "forward", "--repeats", "2", "--out", str(out)]) == 0
    assert calls == [("dot_product", 32), ("torch_sdpa", 32), ("dot_product", 64), ("torch_sdpa", 64), ("torch_sdpa", 128),
                     ("dot_product", 32), ("torch_sdpa", 32), ("torch_sdpa", 64), ("torch_sdpa", 128)]
    _, rows = read_csv(out / "kernels.csv")
    assert [r["status"] for r in rows] == ["ok", "timeout", "skipped (timeout at n=64)", "ok", "ok", "ok"]


def test_the_ratio_to_sdpa_is_the_median_of_per_round_ratios() -> None:
    """Drift between rounds cancels from per-round ratios; the ratio of the medians would not (12/8 here)."""
    def ok(ms: float) -> dict:
        return {"status": "ok", "time_ms": ms, "peak_memory_bytes": 10}

    flash, sdpa = [ok(10), ok(40), ok(12)], [ok(5), ok(10), ok(8)]
    assert kernels.median_ratio(flash, sdpa) == 2.0
    combined = kernels.combine(flash)
    assert (combined["time_ms"], combined["time_ms_min"], combined["time_ms_max"], combined["repeats"]) == (12, 10, 40, 3)
    assert combined["round_times_ms"] == "10.000 40.000 12.000"
    assert kernels.median_ratio(flash, [ok(5), {"status": "timeout"}]) == 2.0  # only rounds where both ran
    assert kernels.combine([ok(1), {"status": "oom"}])["status"] == "oom"
    cases = [case_for("flash", 64, "forward"), case_for("torch_sdpa", 64, "forward")]
    flash_row, sdpa_row = kernels.summarise(cases, [flash, sdpa])
    assert flash_row.time_ratio_to_reference == 2.0 and sdpa_row.time_ratio_to_reference == 1.0


class DriftingClock:
    """A fake clock for `time_paired`: a kernel call costs 2 units, a reference call 1, and the machine
    halves its speed after every pair of timed blocks (each block reads the clock twice: A A B B), so
    the kernel's own times drift 2x per pair while each pair's ratio stays 2."""

    def __init__(self) -> None:
        self.now, self.slowdown, self.reads = 0.0, 1.0, 0

    def __call__(self) -> float:
        self.reads += 1
        now = self.now
        if self.reads % 4 == 0:
            self.slowdown *= 2.0
        return now

    def cost(self, units: float) -> Callable[[], None]:
        def call() -> None:
            self.now += units * 1e-3 * self.slowdown
        return call


def test_paired_timing_cancels_drift_between_kernel_and_reference() -> None:
    clock = DriftingClock()
    time_s, ratio = kernel_case.time_paired(clock.cost(2.0), clock.cost(1.0), min_run_time=0.0, budget_s=60.0,
                                            clock=clock)
    assert ratio == pytest.approx(2.0)  # every pair saw one speed
    assert time_s == pytest.approx(2e-3 * 4)  # the kernel's median block: pairs at slowdown 2, 4, 8 (the singles at 1)
    assert clock.reads == 4 + 4 * kernel_case.MIN_PAIRS  # singles, then MIN_PAIRS pairs when min_run_time is 0


def test_paired_timing_gives_up_when_the_reference_cannot_run() -> None:
    def out_of_memory() -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    clock = DriftingClock()
    assert kernel_case.time_paired(clock.cost(1.0), out_of_memory, 0.0, 60.0, clock=clock) is None
    slow = clock.cost(10_000.0)  # 10 s a call: three pairs would exceed the 20 s budget
    assert kernel_case.time_paired(clock.cost(1.0), slow, 0.0, 20.0, clock=clock) is None

    def broken() -> None:
        raise ValueError("a bug, not a lack of memory")

    with pytest.raises(ValueError):
        kernel_case.time_paired(clock.cost(1.0), broken, 0.0, 60.0, clock=clock)


def test_a_kernel_whose_reference_cannot_be_built_is_timed_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDPA's inputs failing to allocate beside the kernel costs the pairing, not the kernel's result."""
    make_inputs = kernel_case.make_inputs

    def reference_out_of_memory(case: dict, n: int, attn: object) -> tuple:
        if attn is kernel_case.reference_sdpa:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return make_inputs(case, n, attn)

    monkeypatch.setattr(kernel_case, "make_inputs", reference_out_of_memory)
    case = {**case_for("dot_product", 32, "forward"), "memory_limit": None, "pair_with": {"kv_heads": 8}}
    result = kernel_case.measure_case(case)
    assert result["status"] == "ok" and result["time_ms"] > 0 and result["paired_ratio"] is None


def test_paired_ratios_take_precedence_over_per_round_ones() -> None:
    def ok(ms: float, paired: float | None) -> dict:
        return {"status": "ok", "time_ms": ms, "peak_memory_bytes": 10, "paired_ratio": paired}

    flash, sdpa = [ok(10, 1.5), ok(40, 1.1), ok(12, 1.2)], [ok(5, None), ok(10, None), ok(8, None)]
    case, reference = case_for("flash", 64, "forward"), case_for("torch_sdpa", 64, "forward")
    assert kernels.ratios_to_reference(case, flash, sdpa) == ([1.5, 1.1, 1.2], "paired")
    flash[1]["paired_ratio"] = None  # one round could not pair: all rounds fall back to the cross-process ratio
    assert kernels.ratios_to_reference(case, flash, sdpa) == ([2.0, 4.0, 1.5], "rounds")
    assert kernels.ratios_to_reference(case, flash, None) == ([], None)
    assert kernels.ratios_to_reference(reference, sdpa, sdpa) == ([1.0, 1.0, 1.0], "reference")
    flash_row, sdpa_row = kernels.summarise([case, reference], [[ok(10, 1.5), ok(12, 1.3)], sdpa])
    assert flash_row.time_ratio_to_reference == pytest.approx(1.4)
    assert (flash_row.ratio_method, flash_row.round_ratios) == ("paired", "1.500 1.300")
    assert (sdpa_row.time_ratio_to_reference, sdpa_row.ratio_method) == (1.0, "reference")


def test_time_growth_is_the_median_of_per_round_ratios_with_its_exponent() -> None:
    def ok(ms: float) -> dict:
        return {"status": "ok", "time_ms": ms, "peak_memory_bytes": 10}

    cases = [case_for("linear", 1024, "forward"), case_for("linear", 4096, "forward"), case_for("flash", 1024, "forward")]
    results = [[ok(10), ok(20), ok(10)], [ok(40), ok(100), ok(60)], [ok(5)]]  # per round 4, 5, 6; flash: one length
    (line,) = kernels.time_growth(cases, results)
    assert "linear" in line and "t(4096)/t(1024) = 5.00" in line and "(n^1.16)" in line


@pytest.mark.slow
def test_position_embedding_reaches_every_case(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "kernels", "--lengths", "48", "--mechanisms", "flash,local,torch_sdpa", "--passes",
               "forward_backward", "--position_embedding", "alibi", "--out", str(out), *FAST, "attention.window=16"])
    assert rc == 0
    _, rows = read_csv(out / "kernels.csv")
    assert [(r["mechanism"], r["status"], r["position_embedding"]) for r in rows] == [
        ("flash", "ok", "alibi"), ("local", "ok", "alibi"), ("torch_sdpa", "ok", "alibi")]
    assert rows[1]["options"] == "window=16 sinks=0"


def test_every_registered_mechanism_runs_with_its_own_inputs() -> None:
    """Mechanisms that own projections (gates, decays) get them from their layer_inputs; every case of
    every registered mechanism measures (in this process: the command runs the same function in a child)."""
    from transformer_comparison.attention.registry import registered_names

    for mechanism in [*registered_names(), "torch_sdpa"]:
        case = case_for(mechanism, 40, "forward_backward") | {"heads": 2, "kv_heads": 2, "head_dim": 8, "memory_limit": None}
        result = kernel_case.measure_case(case)
        assert result["status"] == "ok" and result["time_ms"] > 0 and result["peak_memory_bytes"] > 0, mechanism
        assert kernels.make_row(case, result).gflops_per_second > 0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_torch_sdpa_baseline_computes_what_dot_product_does(position: str, kv_heads: int, causal: bool) -> None:
    """The SDPA baseline gets the same maths as the kernels: RoPE rotated in, ALiBi as a dense mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    args = {"alibi_slopes": alibi_slopes(4, torch.float64)} if position == "alibi" else {"rope": Rotary(10000.0)}
    expected = build_attention("dot_product")(q, k, v, causal=causal, **args)
    torch.testing.assert_close(kernel_case.reference_sdpa(q, k, v, causal=causal, **args), expected)
    if causal:  # end-aligned queries, as when decoding
        torch.testing.assert_close(kernel_case.reference_sdpa(q[:, :, -3:], k, v, causal=True, **args), expected[:, :, -3:])


def test_crossover_rows_per_mechanism_pass_and_metric() -> None:
    def row(mechanism: str, n: int, time_ms: float | None, memory: int | None, status: str = "ok") -> KernelRow:
        return KernelRow(mechanism=mechanism, seq_len=n, **{"pass": "forward"}, time_ms=time_ms,
                         peak_memory_bytes=memory, status=status)

    rows = [row("dot_product", 100, 1.0, 400), row("dot_product", 400, 16.0, 6400),
            row("dot_product", 1600, None, None, "oom"),
            row("flash", 100, 4.0, 100), row("flash", 400, 4.0, 400), row("flash", 1600, 16.0, 1600)]
    got = {(r.mechanism, r.metric): r.crossover_seq_len for r in kernels.crossovers(rows)}
    assert got == {("flash", "time"): "200", ("flash", "memory"): "below smallest length"}


def test_unknown_mechanism_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "kernels", "--mechanisms", "dot_product,nope", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "nope" in err[0] and "dot_product" in err[0] and "torch_sdpa" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("bad", [["--lengths", "32,x"], ["--lengths", "0"], ["--dtype", "int8"],
                                 ["--passes", "backward"], ["--kv_heads", "3"], ["--repeats", "0"], ["--position_embedding", "learned"]])
def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: list[str]) -> None:
    assert main(["bench", "kernels", *bad, "--out", str(tmp_path / "b")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path: Path) -> None:
    assert main(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path / "b")]) == 2


def test_timeout_is_recorded_not_raised(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "kernels", "--lengths", "32,64", "--mechanisms", "dot_product", "--passes", "forward",
               "--timeout", "0.05", "--out", str(out)])
    assert rc == 0
    _, rows = read_csv(out / "kernels.csv")
    assert [r["status"] for r in rows] == ["timeout", "skipped (timeout at n=32)"]
    assert rows[0]["time_ms"] == "" and rows[0]["peak_memory_bytes"] == ""


def test_out_of_memory_is_recorded(tmp_path: Path) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("the memory cap needs Linux /proc")
    case = case_for("dot_product", 1024, "forward") | {"memory_limit": 0.002}  # 2 MiB: the 32 MiB scores cannot fit
    assert run_child("transformer_comparison.bench.kernel_case", case, kernel_case.RESULT_PREFIX, 120)["status"] == "oom"


def case_for(mechanism: str, n: int, pass_name: str) -> dict:
    """One validated case, as the command builds it (CPU, one thread)."""
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    ns = parser.parse_args(["--lengths", str(n), "--mechanisms", mechanism, "--passes", pass_name,
                            "--device", "cpu", "--threads", "1", "--min_run_time", "0.01"])
    (case,) = kernels.build_cases(ns)
    return case


def test_memory_covers_the_score_matrix_grows_with_n_and_repeats() -> None:
    heads = 8
    peaks = {}
    for n in (512, 1024):
        result = kernel_case.measure_case(case_for("dot_product", n, "forward"))
        assert result["status"] == "ok"
        peaks[n] = result["peak_memory_bytes"]
        assert peaks[n] >= heads * n * n * 4  # the float32 score matrix alone
    assert peaks[1024] > 3 * peaks[512]  # O(n^2)
    again = kernel_case.measure_case(case_for("dot_product", 512, "forward"))["peak_memory_bytes"]
    assert again == peaks[512]


def test_allocator_peak_agrees_with_memtracker_for_unfused_ops() -> None:
    case = case_for("dot_product", 256, "forward_backward")
    attn = build_attention("dot_product")
    inputs, extra = kernel_case.make_inputs(case, 256, attn)
    step = kernel_case.make_step(attn, inputs, extra, True, "forward_backward", {})
    step()
    device = torch.device("cpu")
    peak = measure_peak(step, device, inputs)
    assert peak.method == "allocator_events"
    assert abs(peak.bytes - memtracker_peak(step, device, inputs)) <= 64  # to the byte, bar a scalar
    assert measure_peak(step, device, inputs).bytes == peak.bytes


def test_crossover_interpolates_in_log_space() -> None:
    # ratio 2 at n=100, 0.5 at n=400: log-linear, ratio 1 at n=200
    assert kernels.crossover([100, 400], [2.0, 0.5], "base") == "200"
    assert kernels.crossover([100, 400], [0.5, 0.25], "base") == "below smallest length"
    assert kernels.crossover([100, 400], [0.5, 1.5], "base") == "never"
    assert kernels.crossover([100, 400], [2.0, None], "base").startswith("<= 400")
    assert kernels.crossover([], [], "base") == "no data"


def test_options_and_kv_heads_come_from_the_config_and_the_mechanism() -> None:
    gqa, local = case_for("gqa", 64, "forward"), case_for("local", 64, "forward")
    assert gqa["kv_heads"] == 4 and local["kv_heads"] == 8  # gqa's own policy: half of 8 heads
    assert local["options"] == {"window": 32, "sinks": 0}  # the one default, the config's and the kernel's
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    ns = parser.parse_args(["--lengths", "64", "--mechanisms", "local,gqa", "--passes", "forward", "--device", "cpu",
                            "attention.local.window=128", "attention.gqa.kv_heads=2"])
    local, gqa = kernels.build_cases(ns)
    assert local["options"] == {"window": 128, "sinks": 0} and gqa["kv_heads"] == 2
