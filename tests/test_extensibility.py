"""Adding a mechanism is adding a file: tried as a user would, on a copy of the package.

`attention/local.py` is copied to `attention/my_window.py` under another registered name, and nothing
else changes; the new mechanism then trains, decodes (cached greedy output == uncached), appears in
`tcompare list`, `bench kernels` and `compare`'s results. A mechanism from another installed package
joins through the entry-point group the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import transformer_comparison
from tests.helpers import read_csv, tiny_config


def run(args: list[str], pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def package_with_a_copied_mechanism(tmp_path: Path) -> Path:
    """A copy of the package whose attention/ holds one more file, local.py under the name my_window."""
    site = tmp_path / "site"
    shutil.copytree(Path(transformer_comparison.__file__).parent, site / "transformer_comparison",
                    ignore=shutil.ignore_patterns("__pycache__"))
    source = (site / "transformer_comparison" / "attention" / "local.py").read_text()
    assert source.count('@register_attention("local")') == 1
    copied = source.replace('@register_attention("local")', '@register_attention("my_window")')
    (site / "transformer_comparison" / "attention" / "my_window.py").write_text(copied)
    return site


@pytest.mark.slow
def test_a_copied_mechanism_file_is_a_new_mechanism_everywhere(package_with_a_copied_mechanism: Path, tmp_path: Path):
    site = package_with_a_copied_mechanism
    tc = ["-m", "transformer_comparison"]
    config = tiny_config(tmp_path)

    listed = run([*tc, "list", "mechanisms"], site, tmp_path)
    assert listed.returncode == 0 and "my_window:" in listed.stdout

    run_dir = tmp_path / "run"
    trained = run([*tc, "train", "--config", str(config), "--attention_type", "my_window", "--position_embedding", "rope",
                   "--out", str(run_dir), "attention.my_window.window=4"], site, tmp_path)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attention_type"] == "my_window" and summary["status"] == "completed"

    outputs = []
    for cache in ([], ["--no_cache"]):
        generated = run([*tc, "generate", "--run", str(run_dir), "--prompt", "the ", "--max_new_tokens", "10",
                         "--temperature", "0", *cache], site, tmp_path)
        assert generated.returncode == 0, generated.stderr
        outputs.append(generated.stdout)
    assert outputs[0] == outputs[1]  # greedy decoding from the bounded cache == full recomputation

    bench = tmp_path / "bench"
    benched = run([*tc, "bench", "kernels", "--lengths", "32", "--mechanisms", "my_window,local", "--passes", "forward",
                   "--min_run_time", "0.01", "--threads", "1", "--repeats", "1", "--out", str(bench)], site, tmp_path)
    assert benched.returncode == 0, benched.stderr
    _, rows = read_csv(bench / "kernels.csv")
    assert [(r["mechanism"], r["status"]) for r in rows] == [("my_window", "ok"), ("local", "ok")]
    assert rows[0]["gflops_per_second"] and rows[0]["options"] == rows[1]["options"] == "window=32 sinks=0"

    grid = tmp_path / "grid"
    compared = run([*tc, "compare", "--config", str(config), "--attention_types", "my_window",
                    "--position_embeddings", "alibi", "--out", str(grid)], site, tmp_path)
    assert compared.returncode == 0, compared.stderr
    _, results = read_csv(grid / "results.csv")
    assert [(r["attention_type"], r["position_embedding"]) for r in results] == [("my_window", "alibi")]


def test_an_installed_package_adds_a_mechanism_through_the_entry_point_group(tmp_path: Path):
    site = tmp_path / "site"
    (site / "extmech-0.1.dist-info").mkdir(parents=True)
    (site / "extmech-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: extmech\nVersion: 0.1\n")
    (site / "extmech-0.1.dist-info" / "entry_points.txt").write_text(
        "[transformer_comparison.attention]\nmy_dense = extmech\n")
    (site / "extmech.py").write_text(
        "from transformer_comparison.attention.dot_product import DotProductAttention\n"
        "from transformer_comparison.attention.registry import register_attention\n\n\n"
        "@register_attention('my_dense')\nclass MyDense(DotProductAttention):\n    '''Dense attention from another package.'''\n")
    source = Path(transformer_comparison.__file__).parents[1]
    code = ("from transformer_comparison.attention import registered_names, build_attention\n"
            "from transformer_comparison.config import load_config\n"
            "print(registered_names()); print(load_config(None, attention_type='my_dense').attention.type)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(source)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'my_dense'" in done.stdout.splitlines()[0] and done.stdout.splitlines()[1] == "my_dense"
