"""`tcompare bench decode`: a tiny run end to end, cache-size relations, failure statuses, bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.helpers import read_csv, run_cli, tiny_config
from transformer_comparison.bench import decode
from transformer_comparison.cli import main

FAST = ["--new_tokens", "2", "--threads", "1"]


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, attention={"window": 4}, position={"type": "alibi"})
    run_dir = tmp_path / "run"
    trained = run_cli("train", "--config", str(config), "--out", str(run_dir))
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "bench"
    mechanisms = ["dot_product", "linear", "sparse", "local", "gqa", "flash"]
    rc = main(["bench", "decode", "--run", str(run_dir), "--contexts", "8,4,40", "--out", str(out),
               "--mechanisms", ",".join(mechanisms), *FAST])
    assert rc == 0
    columns, rows = read_csv(out / "decode.csv")
    assert columns[:6] == ["mechanism", "position_embedding", "context_length", "ms_per_token", "cache_bytes", "status"]
    assert columns[6:8] == ["threads", "batch"]
    assert [(r["mechanism"], int(r["context_length"])) for r in rows] == [(m, c) for m in mechanisms for c in (4, 8, 40)]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["position_embedding"] == "alibi" and row["threads"] == "1" and row["batch"] == "1"
        assert float(row["ms_per_token"]) > 0 and int(row["cache_bytes"]) > 0
        assert row["weights"] == ("trained" if row["mechanism"] == "dot_product" else "random")
        assert row["train_context_length"] == "16"  # 40 is beyond it: fine for decoding
    cache = {(r["mechanism"], int(r["context_length"])): int(r["cache_bytes"]) for r in rows}
    # dot_product: layers (1) * (k, v) * heads (4) * head_dim (8) * 4 bytes per token
    assert [cache["dot_product", c] for c in (4, 8, 40)] == [2 * 4 * 8 * 4 * c for c in (4, 8, 40)]
    assert all(cache["gqa", c] * 2 == cache["dot_product", c] for c in (4, 8, 40))  # 2 kv heads of 4
    assert cache["local", 4] == cache["local", 8] == cache["local", 40] == 2 * 4 * 8 * 4 * 3  # window - 1 keys
    assert cache["linear", 4] == cache["linear", 8] == cache["linear", 40] == 4 * (8 * 8 + 8) * 4
    assert cache["sparse", 40] == cache["flash", 40] == cache["dot_product", 40]
    for name in ("decode_latency.png", "decode_cache.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "local: cache constant" in printed and "linear: cache constant" in printed and "dot_product: cache x10" in printed


def test_a_timeout_is_recorded_and_later_contexts_skipped(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    out = tmp_path / "bench"
    rc = main(["bench", "decode", "--config", str(config), "--mechanisms", "linear", "--contexts", "4,8",
               "--timeout", "0.01", "--out", str(out), *FAST])
    assert rc == 0
    _, rows = read_csv(out / "decode.csv")
    assert [(r["context_length"], r["status"]) for r in rows] == [("4", "timeout"), ("8", "skipped (timeout at context 4)")]
    assert rows[0]["ms_per_token"] == "" and rows[0]["weights"] == "random"


def test_a_failing_case_is_recorded_not_raised(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    args = parser.parse_args(["--config", str(tiny_config(tmp_path)), "--mechanisms", "dot_product", "--contexts", "4,8", *FAST])
    [case] = decode.build_cases(args)
    case["config"]["model"]["d_model"] = "not a number"  # the child cannot build the model
    results = decode.run_mechanism(case, timeout=120)
    assert [r["context_length"] for r in results] == [4, 8]
    assert results[0]["status"].startswith("UserError: model.d_model=")
    assert results[1]["status"].startswith("skipped (UserError")


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --run DIR and --config FILE"),
    (["--config", "CONFIG", "--run", "RUN"], "give exactly one of --run DIR and --config FILE"),
    (["--config", "CONFIG", "--contexts", "128,x"], "--contexts: 'x' is not an integer"),
    (["--config", "CONFIG", "--contexts", "0"], "--contexts: 0 must be >= 1"),
    (["--config", "CONFIG", "--mechanisms", "dot_product,nope"], "--mechanisms: unknown nope; valid: dot_product"),
    (["--config", "CONFIG", "--new_tokens", "0"], "--new_tokens must be >= 1"),
    (["--config", "CONFIG", "--position_embedding", "learned"], "--position_embedding: unknown learned; valid: sinusoidal"),
    (["--config", "CONFIG", "model.d_model=30"], "not divisible by model.num_heads"),
    (["--run", "RUN"], "no-run does not exist"),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    config = tiny_config(tmp_path)
    args = [str(config) if a == "CONFIG" else str(tmp_path / "no-run") if a == "RUN" else a for a in args]
    out = tmp_path / "bench"
    assert main(["bench", "decode", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tcompare bench") and "error: " in err and message in err and "\n" not in err
    assert not out.exists()


def test_checks_report_each_mechanism_the_same_way() -> None:
    from transformer_comparison.artifacts.bench import DecodeRow

    def row(mechanism: str, c: int, ms: float, cache: int) -> DecodeRow:
        return DecodeRow(mechanism=mechanism, position_embedding="rope", context_length=c, ms_per_token=ms,
                         cache_bytes=cache, status="ok")

    rows = [row("linear", 128, 9.0, 10), row("linear", 256, 1.0, 10), row("linear", 8192, 1.3, 10),
            row("local", 16, 1.0, 100), row("local", 64, 1.0, 120), row("local", 128, 1.0, 120),
            row("dot_product", 64, 1.0, 800), row("dot_product", 256, 1.5, 3200)]
    notes = decode.checks(rows)
    assert notes[0] == "linear: ms/token 1.000 at 256 -> 1.300 at 8192 (+30%); cache constant at 10 bytes from context 128"
    assert notes[1] == "local: cache constant at 120 bytes from context 64"
    assert notes[2] == "dot_product: cache x4 from 64 to 256"


def test_registered_as_a_bench_subcommand() -> None:
    parser = argparse.ArgumentParser()
    from transformer_comparison.bench import BENCHMARKS, add_arguments

    assert "decode" in BENCHMARKS
    add_arguments(parser)
    args = parser.parse_args(["decode", "--config", "x.yaml", "training.seed=3"])
    assert args.overrides == ["training.seed=3"] and args.contexts == decode.DEFAULT_CONTEXTS
