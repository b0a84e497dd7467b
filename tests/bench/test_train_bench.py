"""`tcompare bench train`: the reference and the trainer alternate on one recipe; rows, ratios, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import read_csv, tiny_config
from transformer_comparison.allocator import glibc
from transformer_comparison.bench import reference_gpt
from transformer_comparison.bench.train import flops_per_token
from transformer_comparison.cli import main
from transformer_comparison.config import load_config


@pytest.mark.slow
def test_reference_and_cells_alternate_and_are_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    out = tmp_path / "bench"
    rc = main(["bench", "train", "--config", str(config), "--steps", "8", "--repeats", "1", "--log_interval", "2",
               "--warmup_windows", "1", "--threads", "1", "--cells", "local:rope", "--out", str(out), "attention.local.window=4",
               "--reference_keeps_freed_memory"])
    assert rc == 0
    columns, rows = read_csv(out / "train_bench.csv")
    assert columns[:5] == ["implementation", "attention_type", "position_embedding", "repeat", "median_step_ms"]
    assert [(r["implementation"], r["repeat"]) for r in rows] == [("nanogpt_reference", "0"), ("tcompare:local+rope", "0")]
    for row in rows:
        assert row["status"] == "ok" and float(row["median_step_ms"]) > 0 and row["windows"] == "3"
        assert 0 < float(row["fraction_of_peak"]) < 1.5 and float(row["peak_gflops"]) > 0
        assert row["keeps_freed_memory"] == str(glibc() is not None)  # both, as asked
    printed = capsys.readouterr().out
    assert "ratio_to_reference" in printed and "tcompare:local+rope" in printed


def test_the_reference_keeps_glibcs_allocator_defaults_unless_asked(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path))
    case = {"config": cfg.model_dump(mode="json"), "steps": 2, "log_interval": 1, "threads": 1}
    result = reference_gpt.train_reference(case)
    assert result["status"] == "ok" and len(result["window_step_ms"]) == 2
    assert result["keeps_freed_memory"] is False


def test_the_reference_is_nanogpts_model() -> None:
    model = reference_gpt.NanoGPT(vocab_size=11, context=8, d_model=16, heads=2, layers=2, bias=False)
    assert model.lm_head.weight is model.wte.weight  # tied
    idx = torch.randint(0, 11, (3, 8))
    loss = model(idx, idx)
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.5  # starts near uniform
    # per block: c_attn 3d^2, c_proj d^2, MLP 8d^2, two LayerNorm weights
    expected = 2 * (12 * 16 * 16 + 2 * 16) + 16 + 11 * 16 + 8 * 16
    assert sum(p.numel() for p in model.parameters()) == expected


def test_flops_per_token_uses_the_non_embedding_parameters(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path))
    d, layers, ctx = cfg.model.d_model, cfg.model.num_layers, cfg.model.context_length
    assert flops_per_token(cfg, 40, reference=True) == 6 * (layers * (12 * d * d + 2 * d) + d) + 12 * layers * d * ctx
    assert flops_per_token(cfg, 40, reference=False) > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--cells", "dot_product"], "mechanism:encoding"),
    (["--cells", "softmax:rope"], "mechanism:encoding"),
    (["--steps", "4", "--log_interval", "2", "--warmup_windows", "2"], "more than --warmup_windows"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "train", "--config", str(tiny_config(tmp_path)), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_the_ratio_is_the_median_of_ratios_within_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    """A repeat's runs follow each other, so its ratio cancels a machine that slowed down for a while;
    the ratio of the medians (52/50 here) would not."""
    from transformer_comparison.artifacts.bench import TrainBenchRow
    from transformer_comparison.bench.train import REFERENCE, print_summary

    def row(name: str, repeat: int, ms: float) -> TrainBenchRow:
        return TrainBenchRow(implementation=name, repeat=repeat, median_step_ms=ms, status="ok")

    times = [(50.0, 40.0), (100.0, 90.0), (40.0, 52.0)]  # (reference, cell) per repeat: ratios 0.8, 0.9, 1.3
    print_summary([r for i, (ref, cell) in enumerate(times) for r in (row(REFERENCE, i, ref), row("tcompare:x", i, cell))])
    cell_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tcompare:x"))
    assert cell_line.split()[-1] == "0.900"
