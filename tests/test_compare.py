"""`tcompare compare` end to end on a tiny grid: results, report, resume, failures, interrupts, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.helpers import read_csv
from transformer_comparison.cli import build_parser, main
from transformer_comparison.compare import extras
from transformer_comparison.compare.cells import cell_action
from transformer_comparison.compare.command import prepare_output_dir, seconds_left
from transformer_comparison.compare.plan import Plan, make_plan
from transformer_comparison.config import load_config

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while the cat sat on the mat and sang".split()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """A tiny model and a few steps on a small local text file, W&B off."""
    root = tmp_path_factory.mktemp("tiny")
    text = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(6000))
    (root / "tiny.txt").write_text(text)
    config = {
        "model": {"d_model": 16, "num_heads": 2, "num_layers": 1, "context_length": 16},
        "training": {"batch_size": 4, "max_steps": 6, "warmup_steps": 1, "eval_interval": 3, "eval_batches": 2,
                     "checkpoint_interval": 3, "device": "cpu", "dtype": "float32", "seed": 7},
        "data": {"dataset": str(root / "tiny.txt"), "cache_dir": str(root / "cache")},
        "logging": {"wandb": "disabled", "log_interval": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention on a shared machine


GRID = ["--attention_types", "gqa,dot_product", "--position_embeddings", "rope", "--sweep", "training.learning_rate=1e-3,3e-3"]
NAMES = ["dot_product-rope-learning_rate=0.001-seed7", "dot_product-rope-learning_rate=0.003-seed7",
         "gqa-rope-learning_rate=0.001-seed7", "gqa-rope-learning_rate=0.003-seed7"]


def compare_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", "--config", str(config), "--out", str(out), *extra]


def read_rows(out: Path) -> list[dict[str, str]]:
    return read_csv(out / "results.csv")[1]


@pytest.fixture(scope="module")
def tiny_comparison(tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "grid"
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert main(compare_args(tiny_config, out, *GRID)) == 0
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return out


def snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------------------------


def test_end_to_end(tiny_comparison, capsys):
    out = tiny_comparison
    columns, rows = read_csv(out / "results.csv")
    assert columns[:4] == ["attention_type", "position_embedding", "seed", "training.learning_rate"]
    assert [(r["attention_type"], r["training.learning_rate"], r["seed"]) for r in rows] == [
        ("dot_product", "0.001", "7"), ("dot_product", "0.003", "7"), ("gqa", "0.001", "7"), ("gqa", "0.003", "7")]
    assert [r["run"] for r in rows] == [f"runs/{name}" for name in NAMES]
    assert all(r["status"] == "completed" and float(r["final_val_loss"]) > 0 and r["steps"] == "6" for r in rows)
    assert rows[2]["num_kv_heads"] == "1" and rows[0]["num_kv_heads"] == "2"
    for row in rows:  # each run trained with its own rate, and its accounting is in the row
        run = out / row["run"]
        assert load_config(run / "config.yaml").training.learning_rate == float(row["training.learning_rate"])
        assert float(row["training_flops"]) == float(row["training_flops_per_token"]) * int(row["tokens_seen"]) > 0
        assert int(row["embedding_parameters"]) + int(row["non_embedding_parameters"]) == int(row["num_parameters"])
        assert (run / "train.log").is_file() and json.loads((run / "cell.json").read_text())["status"] == "completed"
    assert float(rows[2]["parameter_ratio"]) < 1.0 == float(rows[0]["parameter_ratio"])  # gqa projects fewer kv heads
    assert len(json.loads((out / "results.json").read_text())) == 4
    assert len(read_csv(out / "aggregate.csv")[1]) == 4
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["grid"] == {"attention_types": ["dot_product", "gqa"], "position_embeddings": ["rope"], "seeds": 1,
                                  "base_seed": 7, "sweep": {"training.learning_rate": [0.001, 0.003]}, "match": None}
    assert load_config(out / "comparison_config.yaml").model.d_model == 16
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "Tokens-matched: 6 optimizer steps" in md
    # the ranking trains each mechanism at its own best rate
    for mechanism in ("dot_product", "gqa"):
        losses = {r["training.learning_rate"]: float(r["final_val_loss"]) for r in rows if r["attention_type"] == mechanism}
        best = min(losses, key=losses.get)
        assert re.search(rf"\n\| \d \| {mechanism} \| rope \| {best} \| ", md.split("## Ranking by validation loss")[1]), mechanism
    assert (out / "plots" / "learning_rate.png").is_file()
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) >= 4 and all(src.startswith("data:image/png;base64,") for src in images)
    # `tcompare report DIR` rebuilds it from the saved files
    (out / "report.md").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == md
    assert (out / "report.html").is_file()


def test_resume_skips_completed_and_finishes_the_rest(tiny_comparison, tiny_config, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(tiny_comparison, out)
    runs = out / "runs"
    resumed_name, fresh_name = NAMES[1], NAMES[2]
    (runs / resumed_name / "summary.json").unlink()  # killed after its last checkpoint: resumed
    (runs / fresh_name / "summary.json").unlink()  # killed before any checkpoint: trained again
    shutil.rmtree(runs / fresh_name / "checkpoints")
    untouched = {name: snapshot(runs / name) for name in (NAMES[0], NAMES[3])}
    assert main(compare_args(tiny_config, out, *GRID)) == 0
    for name, files in untouched.items():
        assert snapshot(runs / name) == files
    resumed = json.loads((runs / resumed_name / "cell.json").read_text())
    fresh = json.loads((runs / fresh_name / "cell.json").read_text())
    assert (resumed["action"], resumed["attempts"], fresh["action"], fresh["attempts"]) == ("resume", 2, "fresh", 2)
    assert all(r["status"] == "completed" for r in read_rows(out))


def test_a_grown_grid_keeps_its_finished_runs_and_trains_the_new_ones(tiny_comparison, tiny_config, tmp_path, capsys):
    out = tmp_path / "grid"
    shutil.copytree(tiny_comparison, out)
    untouched = {name: snapshot(out / "runs" / name) for name in NAMES}
    grown = [*GRID[:-1], "training.learning_rate=1e-3,3e-3,1e-2"]
    assert main(compare_args(tiny_config, out, *grown)) == 0
    printed = capsys.readouterr().out
    assert "the grid grows (sweep training.learning_rate=0.001,0.003 -> training.learning_rate=0.001,0.003,0.01)" in printed
    assert "4 completed earlier, 0 to resume, 2 to train" in printed
    for name, files in untouched.items():
        assert snapshot(out / "runs" / name) == files
    rows = read_rows(out)
    assert sorted(r["training.learning_rate"] for r in rows) == ["0.001", "0.001", "0.003", "0.003", "0.01", "0.01"]
    assert all(r["status"] == "completed" for r in rows)
    assert json.loads((out / "comparison.json").read_text())["grid"]["sweep"] == {"training.learning_rate": [1e-3, 3e-3, 1e-2]}
    # shrinking is not growing: a grid without gqa would orphan its runs
    assert main(compare_args(tiny_config, out, "--attention_types", "dot_product", *grown[2:])) == 2
    err = capsys.readouterr().err.strip()
    assert "different comparison" in err and "attention_types dot_product,gqa -> dot_product" in err and "may grow" in err


def test_failing_cell_does_not_stop_the_others(tiny_config, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = compare_args(tiny_config, out, "--attention_types", "dot_product", "--position_embeddings", "rope,alibi")
    plan = make_plan(build_parser().parse_args(argv))
    prepare_output_dir(plan, None, "test")
    broken = plan.run_dir(plan.cells[0])  # the first cell finds an unreadable checkpoint and fails on resume
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    shutil.copy(plan.config_path, broken / "config.yaml")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "1 of 2 runs did not complete" in err[-1]
    rows = {r["position_embedding"]: r for r in read_rows(out)}
    assert rows["rope"]["status"] == "failed" and "corrupt" in rows["rope"]["error"]
    assert rows["alibi"]["status"] == "completed"
    md = (out / "report.md").read_text()
    assert "Runs that did not complete" in md and "corrupt" in md
    # the same command retries it (from scratch, since resuming failed) and completes the comparison
    assert main(argv) == 0
    assert all(r["status"] == "completed" for r in read_rows(out))


def test_interrupt_then_resume(tiny_config, tmp_path):
    out = tmp_path / "cmp"
    argv = compare_args(tiny_config, out, "--attention_types", "local", "--position_embeddings", "alibi", "training.max_steps=1000000",
                        "training.time_budget_seconds=3", "training.eval_interval=100000", "training.checkpoint_interval=100000")
    process = subprocess.Popen([sys.executable, "-m", "transformer_comparison", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = out / "runs" / "local-alibi-seed7"
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C on a terminal reaches the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr.strip().splitlines()[-1]
    (row,) = read_rows(out)
    assert row["status"] == "interrupted"
    assert (run / "checkpoints" / "latest.pt").is_file()
    assert cell_action(run) == "resume"
    # the same command continues the run from its checkpoint to the end of its (3 s) budget
    assert main(argv) == 0
    record = json.loads((run / "cell.json").read_text())
    assert (record["action"], record["status"], record["attempts"]) == ("resume", "completed", 2)
    assert json.loads((run / "summary.json").read_text())["train_time_seconds"] >= 3


# ----------------------------------------------------------------------------------------------
# plans and bad input (nothing trained)


def plan_for(*argv: str) -> Plan:
    return make_plan(build_parser().parse_args(["compare", *argv]))


def test_presets(tiny_config):
    quick = plan_for("--config", str(tiny_config), "--preset", "quick", "model.num_layers=3").config
    assert (quick.data.dataset, quick.data.tokenizer, quick.logging.wandb) == ("python-stdlib", "char", "disabled")
    assert quick.model.context_length == 128 and quick.model.num_layers == 3  # user overrides win
    nano = plan_for("--config", str(tiny_config), "--preset", "nanogpt-cpu").config
    recipe = load_config(REPO / "configs" / "nanogpt_cpu.yaml")
    for section in ("model", "training", "data"):
        got, want = getattr(nano, section).model_dump(), getattr(recipe, section).model_dump()
        ignored = {"seed", "checkpoint_interval", "cache_dir"}
        assert {k: v for k, v in got.items() if k not in ignored} == {k: v for k, v in want.items() if k not in ignored}, section


def test_a_missing_dataset_is_one_error_before_anything_is_written(tiny_config, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = compare_args(tiny_config, out, "--attention_types", "dot_product", f"data.dataset={tmp_path / 'absent.txt'}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.txt" in err[0] and "no such file" in err[0], err
    assert not out.exists()


def test_the_data_checked_is_each_swept_dataset(tiny_config, tmp_path, monkeypatch, capsys):
    from transformer_comparison.compare import command
    from transformer_comparison.errors import UserError

    dataset = yaml.safe_load(tiny_config.read_text())["data"]["dataset"]
    absent = str(tmp_path / "absent.txt")
    out = tmp_path / "grid"
    grid = ["--attention_types", "dot_product", "--position_embeddings", "rope"]
    assert main(compare_args(tiny_config, out, *grid, "--sweep", f"data.dataset={dataset},{absent}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.txt" in err[0] and not out.exists(), err

    def prepare(data, vocab_size):
        prepared.append(data.dataset)
        raise UserError("checked")  # stop before anything trains

    prepared: list[str] = []
    monkeypatch.setattr(command, "prepare_data", prepare)
    config = yaml.safe_load(tiny_config.read_text())
    config["data"]["dataset"] = absent
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump(config))
    assert main(compare_args(elsewhere, out, *grid, "--sweep", f"data.dataset={dataset}")) == 2
    assert prepared == [dataset] and not out.exists()  # the swept dataset, not the base config's


def test_the_data_is_prepared_only_while_some_run_is_left_to_train(tiny_comparison, tiny_config, tmp_path, monkeypatch):
    from transformer_comparison.compare import command

    out = tmp_path / "grid"
    shutil.copytree(tiny_comparison, out)
    prepared = []
    monkeypatch.setattr(command, "prepare_data", lambda data, vocab_size: prepared.append(data.dataset))
    assert main(compare_args(tiny_config, out, *GRID)) == 0  # finished: the report is rebuilt, no data read
    assert prepared == []
    (out / "runs" / NAMES[0] / "summary.json").unlink()
    assert main(compare_args(tiny_config, out, *GRID)) == 0
    assert prepared == [yaml.safe_load(tiny_config.read_text())["data"]["dataset"]]


def test_foreign_output_directories(tiny_config, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(compare_args(tiny_config, other)) == 2
    assert "holds no comparison.json" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    out = tmp_path / "cmp"
    argv = compare_args(tiny_config, out, "--attention_types", "local")
    plan = make_plan(build_parser().parse_args(argv))
    prepare_output_dir(plan, None, "test")
    before = sorted(p.name for p in out.rglob("*"))
    for changed, reason in ((["training.max_steps=7"], "training.max_steps 6 -> 7"), (["--position_embeddings", "rope"], "grid")):
        assert main(argv + changed) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "different comparison" in err[0] and reason in err[0], err
    assert main(compare_args(tiny_config, out, "--attention_types", "linear")) == 2
    assert sorted(p.name for p in out.rglob("*")) == before


def test_optional_steps_are_recorded_not_fatal(tiny_config, tmp_path, monkeypatch):
    plan = plan_for("--config", str(tiny_config), "--out", str(tmp_path / "cmp"), "--attention_types", "local")
    prepare_output_dir(plan, None, "test")
    monkeypatch.setattr(extras, "available", lambda command, module: False)
    monkeypatch.setattr(extras, "bench_available", lambda name: False)
    records = extras.run_extras(plan, bench=True, extrapolate=True)
    assert [(r["name"], r["status"]) for r in records] == [
        ("bench kernels", "unavailable"), ("bench decode", "unavailable"), ("eval (extrapolation)", "unavailable")]
    failing = [sys.executable, "-c", "import sys; print('progress'); print('it broke', file=sys.stderr); sys.exit(3)"]
    record = extras.run_extra(plan.out, "bench kernels", failing, plan.out / "bench" / "kernels.log")
    assert (record["status"], record["error"]) == ("failed", "exit 3: it broke")


def test_the_kernel_benchmark_times_the_mechanisms_as_the_grid_configured_them(tiny_config, tmp_path):
    """--bench passes every mechanism's options from the comparison's config to `bench kernels` (it once
    looked for flags that no longer existed, and timed local at its default window whatever the grid said)."""
    import argparse

    from transformer_comparison.bench import kernels

    plan = plan_for("--config", str(tiny_config), "--out", str(tmp_path / "cmp"), "--attention_types", "local,flash",
                    "attention.local.window=24", "attention.flash.block_size=16")
    arguments = extras.kernel_bench_arguments(plan, tmp_path / "bench")
    assert "attention.local.window=24" in arguments and "attention.flash.block_size=16" in arguments
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    cases = kernels.build_cases(parser.parse_args(arguments))
    assert {case["mechanism"]: case["options"] for case in cases} == {
        "local": {"window": 24, "sinks": 0}, "flash": {"block_size": 16, "use_sdpa": False}}


def test_kill_9_of_compare_leaves_no_trainer(tiny_config, tmp_path):
    out = tmp_path / "cmp"
    argv = compare_args(tiny_config, out, "--attention_types", "local", "--position_embeddings", "rope", "training.max_steps=1000000",
                        "training.eval_interval=100000", "training.checkpoint_interval=100000")
    process = subprocess.Popen([sys.executable, "-m", "transformer_comparison", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    run = out / "runs" / "local-rope-seed7"
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    trainers = [pid for pid in children_of(process.pid)]
    assert trainers
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in trainers):
        assert time.monotonic() < deadline, "the trainer outlived its comparison"
        time.sleep(0.1)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_stop_request_in_the_run_directory_interrupts_the_waited_child(tmp_path):
    """Ctrl-C of a Ray grid also leaves a stop file, which the task watches: SIGINT reaches the trainer
    even when Ray's cancel does not reach the task."""
    import signal as signals
    import subprocess
    import sys
    import threading

    from transformer_comparison.compare.cells import STOP_FILE, request_stop, wait_interruptibly

    # the child takes SIGINT itself, as the trainer does (session.StopRequest): a suite started in the
    # background of a non-interactive shell (`make test &`) starts with SIGINT ignored, and a child
    # would inherit that
    script = ("import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"  # a SIGINT mid-startup is another test
    threading.Timer(0.3, request_stop, args=(tmp_path,)).start()
    started = time.monotonic()
    assert wait_interruptibly(child, tmp_path / STOP_FILE) == -signals.SIGINT
    assert time.monotonic() - started < 10
    child.stdout.close()
    request_stop(tmp_path / "not-there")  # a cell whose directory does not exist yet: nothing to do, no error


def test_a_config_key_added_to_the_program_later_does_not_make_a_comparison_different():
    from transformer_comparison.compare.command import config_differences

    old = {"model": {"d_model": 64}, "training": {"learning_rate": 1e-3}}
    assert config_differences(old, {"model": {"d_model": 64, "short_conv": 0}, "training": {"learning_rate": 1e-3}}) == ""
    assert "model.d_model 64 -> 32" in config_differences(old, {"model": {"d_model": 32, "short_conv": 0},
                                                                 "training": {"learning_rate": 1e-3}})


def test_time_left_counts_each_mechanism_at_its_own_speed():
    """A mechanism's pending runs take its finished runs' mean; one not seen yet takes the overall mean."""
    walls = {"dot_product": [10.0, 12.0], "gla": [30.0]}
    pending = Counter({"dot_product": 1, "gla": 2, "retention": 1, "linear": 0})
    overall = (10.0 + 12.0 + 30.0) / 3
    assert seconds_left(walls, pending, jobs=1) == pytest.approx(11.0 + 2 * 30.0 + overall)
    assert seconds_left(walls, pending, jobs=2) == pytest.approx((11.0 + 2 * 30.0 + overall) / 2)
    assert seconds_left(walls, Counter({"gla": 0}), jobs=1) == 0.0
