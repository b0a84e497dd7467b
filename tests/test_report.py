"""The report on synthetic comparison directories (no training): results tables, the ranking and its
statistics, the learning-rate choice, the scaling section, report.md/html, `tcompare report`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.comparison_fixtures import NON_EMBEDDING, VOCAB, D_MODEL, make_comparison
from tests.helpers import read_csv
from transformer_comparison import report
from transformer_comparison.artifacts.comparison import SkippedCell
from transformer_comparison.cli import main

ATTENTION = ["dot_product", "gqa"]
POSITION = ["rope", "alibi"]
T_975 = {1: 12.706, 2: 4.303}  # Student's t, 97.5% quantile, from the printed tables (degrees of freedom -> t)


def rows_of(path: Path) -> list[dict[str, str]]:
    return read_csv(path)[1]


def section(md: str, title: str) -> str:
    return md.split(f"## {title}")[1].split("\n## ")[0]


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_results_tables(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, ATTENTION, POSITION, seeds=2, failed=("gqa-alibi-seed1",))
    report.write_results(out)
    columns, table = read_csv(out / "results.csv")
    assert columns[:3] == ["attention_type", "position_embedding", "seed"]
    for column in ("final_val_loss", "tokens_per_second", "num_parameters", "mean_attention_entropy", "status", "error",
                   "embedding_parameters", "non_embedding_parameters", "training_flops", "tokens_seen", "wall_seconds", "run"):
        assert column in columns, column
    failed = [r for r in table if r["status"] == "failed"]
    assert [(r["attention_type"], r["position_embedding"], r["seed"]) for r in failed] == [("gqa", "alibi", "1")]
    assert "diverged" in failed[0]["error"]
    first = table[0]
    assert int(first["embedding_parameters"]) == VOCAB * D_MODEL and int(first["non_embedding_parameters"]) == NON_EMBEDDING
    assert float(first["training_flops"]) == 6.0 * NON_EMBEDDING * int(first["tokens_seen"])
    data = json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert [r["final_val_loss"] for r in data if (r["attention_type"], r["position_embedding"], r["seed"]) == ("gqa", "alibi", 1)] == [None]
    agg = {(r["attention_type"], r["position_embedding"]): r for r in rows_of(out / "aggregate.csv")}
    cell = agg[("dot_product", "rope")]
    assert cell["completed"] == "2"
    assert float(cell["final_val_loss_mean"]) == pytest.approx(2.015)
    std = 0.01 / math.sqrt(2)
    assert float(cell["final_val_loss_std"]) == pytest.approx(std)
    half = T_975[1] * std / math.sqrt(2)
    assert float(cell["final_val_loss_ci_low"]) == pytest.approx(2.015 - half, rel=1e-4)
    assert float(cell["final_val_loss_ci_high"]) == pytest.approx(2.015 + half, rel=1e-4)
    assert agg[("gqa", "alibi")]["completed"] == "1" and agg[("gqa", "alibi")]["failed"] == "1"
    assert agg[("gqa", "alibi")]["final_val_loss_ci_low"] == ""  # one completed seed: no interval


def test_report_contents(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, [*ATTENTION, "retention"], POSITION, seeds=2, preset="quick", extras=True, no_entropy=("retention",),
                    failed=("gqa-alibi-seed1",), parameters=lambda c: int(NON_EMBEDDING * (0.85 if c.attention_type == "gqa" else 1)),
                    skipped=[SkippedCell(attention_type="retention", position_embedding="alibi", reason="decay already encodes distance")])
    md_path, html_path = report.build_report(out)
    md, page = md_path.read_text(), html_path.read_text()
    assert "smoke" in md.lower() and "smoke" in page.lower()
    assert "Tokens-matched: 100 optimizer steps" in md
    ranking = section(md, "Ranking by validation loss")
    lines = table_lines(ranking)
    assert "val loss (nats/token)" in lines[0] and "peak memory (MiB)" in lines[0] and "95% interval" in lines[0]
    assert lines[1].startswith("| 1 | dot_product | rope | **2.0150 ± 0.0071** |")
    # gqa is 15% smaller than dot_product: flagged; the mechanism without attention entropy says n/a
    gqa = next(line for line in lines if "| gqa | rope |" in line)
    assert "85,000 †" in gqa
    assert "more than 10% from dot_product's" in ranking and "gqa + rope -15.0%" in ranking
    retention = next(line for line in lines if "| retention | rope |" in line)
    assert "| n/a |" in retention
    assert "training diverged: loss is nan at step 7" in section(md, "Runs that did not complete")
    assert "decay already encodes distance" in section(md, "Cells not trained")
    for name in ("val_loss", "throughput_memory", "attention_entropy", "entropy_over_training", "bench_kernels", "bench_decode", "extrapolation"):
        assert (out / "plots" / f"{name}.png").is_file(), name
        assert f"plots/{name}.png" in md
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 7 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert '<td class="best">' in page and "<script" not in page
    assert "not installed" in md and "ppl @ 256" in md and "not measured: 1 oom" in md


def test_html_escapes_what_runs_wrote(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, ATTENTION, POSITION, failed=("gqa-alibi-seed1",))
    record = json.loads((out / "runs" / "gqa-alibi-seed1" / "cell.json").read_text())
    record["error"] = "<script>alert(1)</script> broke"
    (out / "runs" / "gqa-alibi-seed1" / "cell.json").write_text(json.dumps(record))
    _, html_path = report.build_report(out)
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; broke" in page


def lr_loss(cell) -> float:
    """dot_product is best at 1e-3, linear at 4e-3 (a narrower, higher window)."""
    lr = cell.sweep["training.learning_rate"]
    best = {"dot_product": 1e-3, "linear": 4e-3}[cell.attention_type]
    base = {"dot_product": 2.0, "linear": 2.05}[cell.attention_type]
    return base + 0.2 * abs(math.log2(lr / best)) + 0.004 * cell.seed


def test_learning_rate_chosen_per_cell(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, ["dot_product", "linear"], ["rope"], seeds=3, sweep={"training.learning_rate": [1e-3, 2e-3, 4e-3]}, loss=lr_loss)
    report.write_results(out)
    columns, rows = read_csv(out / "results.csv")
    assert columns[:4] == ["attention_type", "position_embedding", "seed", "training.learning_rate"]
    assert {r["training.learning_rate"] for r in rows} == {"0.001", "0.002", "0.004"}
    md = report.build_report(out)[0].read_text()
    lines = table_lines(section(md, "Ranking by validation loss"))
    assert lines[0].split(" | ")[3] == "learning rate"
    assert lines[1].startswith("| 1 | dot_product | rope | 0.001 | **2.0080 ± 0.0040** |")
    assert lines[2].startswith("| 2 | linear | rope | 0.004 | 2.0580 ± 0.0040 |")
    # 3 seeds: the interval is mean +- t(2) * std / sqrt(3); the two cells' intervals do not overlap
    half = T_975[2] * 0.004 / math.sqrt(3)
    assert f"{2.008 - half:.4f} – {2.008 + half:.4f}" in lines[1]
    assert lines[1].split(" | ")[6] == "A" and lines[2].split(" | ")[6] == "B"
    assert "own best learning rate" in md
    assert len(table_lines(section(md, "Every swept setting"))) == 1 + 6
    assert (out / "plots" / "learning_rate.png").is_file()
    # both cells' best rates are at an end of the sweep: the report says their optimum may lie beyond
    edge = next(line for line in section(md, "Ranking by validation loss").splitlines() if line.startswith("At the edge"))
    assert "dot_product + rope at 0.001, the smallest rate swept; linear + rope at 0.004, the largest rate swept" in edge


def test_a_cell_with_no_completed_rate_is_not_in_the_ranking(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, ["dot_product", "linear"], ["rope"], seeds=1, sweep={"training.learning_rate": [5e-4, 1e-3, 2e-3]},
                    loss=lr_loss)
    for run in (out / "runs").iterdir():
        if run.name.startswith("linear"):
            for path in run.iterdir():
                path.unlink()
    md = report.build_report(out)[0].read_text()
    swept = [line.split(" | ") for line in table_lines(section(md, "Every swept setting"))[1:]]
    marked = {(cells[0].strip("| "), cells[2]) for cells in swept if cells[-1].strip(" |") == "yes"}
    assert marked == {("dot_product", "0.001")}
    assert "At the edge" not in md  # dot_product's best rate is inside its sweep, and linear has none


def test_overlapping_intervals_are_grouped(tmp_path):
    out = tmp_path / "cmp"
    spread = {1: 0.0, 2: 0.05, 3: -0.05}
    make_comparison(out, ["dot_product", "gqa", "local"], ["rope"], seeds=3,
                    loss=lambda c: {"dot_product": 2.0, "gqa": 2.01, "local": 2.5}[c.attention_type] + spread[c.seed])
    md = report.build_report(out)[0].read_text()
    ranking = section(md, "Ranking by validation loss")
    groups = [line.split(" | ")[5] for line in table_lines(ranking)[1:]]
    assert groups == ["A", "A", "B"]
    assert "Not distinguishable at these seeds: dot_product + rope = gqa + rope." in ranking


def test_scaling_section_when_a_size_is_swept(tmp_path):
    out = tmp_path / "cmp"
    widths = [32, 64, 128]
    make_comparison(out, ["dot_product", "linear"], ["rope"], sweep={"model.d_model": widths},
                    parameters=lambda c: 1000 * c.sweep["model.d_model"] ** 2 // 64,
                    loss=lambda c: 3.0 - 0.3 * widths.index(c.sweep["model.d_model"]) + (0.1 if c.attention_type == "linear" else 0))
    md = report.build_report(out)[0].read_text()
    scaling = section(md, "Scaling: loss against training compute")
    lines = table_lines(scaling)
    assert lines[0] == "| attention | position | d_model=32 | d_model=64 | d_model=128 |"
    assert lines[1] == "| dot_product | rope | 3.0000 @ 1.97e+10 | 2.7000 @ 7.86e+10 | 2.4000 @ 3.15e+11 |"
    assert (out / "plots" / "scaling.png").is_file()
    assert "learning_rate.png" not in md  # nothing to choose: no learning-rate section


def test_report_command_rebuilds(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, ATTENTION, POSITION)
    assert main(["report", str(out)]) == 0
    first = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "results.csv").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == first
    assert (out / "results.csv").is_file() and (out / "report.html").is_file()


def test_report_partial_and_pending(tmp_path):
    out = tmp_path / "cmp"
    make_comparison(out, ATTENTION, POSITION)
    for name in ("gqa-rope-seed1", "gqa-alibi-seed1"):
        for path in (out / "runs" / name).iterdir():
            path.unlink()
    md = report.build_report(out)[0].read_text()
    assert "2 completed, 2 pending" in md
    assert "not run yet" in md


def test_directory_written_before_the_accounting(tmp_path):
    """A format-1 comparison.json (no sweep, no per-cell accounting) still reports."""
    out = tmp_path / "cmp"
    make_comparison(out, ATTENTION, POSITION)
    data = json.loads((out / "comparison.json").read_text())
    data["format"] = 1
    data["grid"] = {k: data["grid"][k] for k in ("attention_types", "position_embeddings", "seeds", "base_seed")}
    data["cells"] = [{k: c[k] for k in ("name", "attention_type", "position_embedding", "seed")} for c in data["cells"]]
    for key in ("skipped", "budget", "executor"):
        data.pop(key)
    (out / "comparison.json").write_text(json.dumps(data))
    assert main(["report", str(out)]) == 0
    row = rows_of(out / "results.csv")[0]
    assert int(row["embedding_parameters"]) == VOCAB * D_MODEL and int(row["non_embedding_parameters"]) == NON_EMBEDDING
    assert row["training_flops"] == ""
    assert "Ranking by validation loss" in (out / "report.md").read_text()


def test_report_of_a_directory_without_comparison(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comparison.json" in err[0]


def test_probe_step_and_recall_section(tmp_path, monkeypatch):
    from dataclasses import replace

    import yaml

    from transformer_comparison.cli import build_parser
    from transformer_comparison.compare.extras import probe_step
    from transformer_comparison.compare.plan import make_plan
    from transformer_comparison.probe import settings as probe_settings

    out = tmp_path / "cmp"
    make_comparison(out, ["dot_product", "local"], ["rope"])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"d_model": 16, "num_heads": 2}, "logging": {"wandb": "disabled"}}))
    plan = make_plan(build_parser().parse_args(["compare", "--config", str(config), "--attention_types", "dot_product,local",
                                                "--position_embeddings", "rope", "--out", str(out), "attention.window=4",
                                                "training.learning_rate=3e-3"]))
    tiny = {"seq_lens": (16,), "kv_pairs": (2,), "d_models": (16,), "learning_rates": (1e-2,), "vocab_size": 32,
            "num_train": 128, "num_test": 32, "jobs": 1,
            "budget": probe_settings.Budget(batch_size=16, max_steps=8, warmup_steps=1, eval_interval=4, eval_examples=32)}
    import transformer_comparison.probe as probe
    import transformer_comparison.probe.results as probe_results

    seen, real_run = {}, probe.run_probe

    def recorded_run(settings, out_dir):
        seen["settings"] = settings
        return real_run(settings, out_dir)

    monkeypatch.setattr(probe_settings, "with_preset", lambda settings, name: replace(settings, **tiny))
    monkeypatch.setattr(probe, "run_probe", recorded_run)
    record = probe_step(plan, "mqar")
    assert record["status"] == "completed", record
    # the probe got the grid and the mechanism options, not the comparison's training keys
    assert seen["settings"].overrides == ("attention.window=4",)

    rows = probe_results.read_rows(out / "probe" / "mqar" / "mqar.csv")
    assert sorted({r.attention_type for r in rows}) == ["dot_product", "local"] and {r.position_embedding for r in rows} == {"rope"}
    md = report.build_report(out)[0].read_text()
    assert "## Recall: multi-query associative recall (MQAR)" in md
    linked = re.findall(r"\(plots/(probe_[^)]+)\)", md)
    assert linked and all((out / "plots" / name).is_file() for name in linked)
