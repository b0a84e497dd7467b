"""The command line: every error is one line that names the command it came from, exit status 2."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest
import torch

from transformer_comparison.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "config.yaml")


@pytest.mark.parametrize("argv, prefix", [
    (["train", "--config", CONFIG, "--bogus"], "tcompare train: error: unrecognized arguments: --bogus"),
    (["train", "--config", CONFIG, "training.max_steps=0"], "tcompare train: error: training.max_steps=0"),
    (["bench", "kernels", "--repeats", "0"], "tcompare bench kernels: error: --repeats"),
    (["bench", "kernels", "--lengths", "0"], "tcompare bench kernels: error: argument --lengths"),
    (["probe", "mqar", "--seeds", "0"], "tcompare probe mqar: error: --seeds"),
    (["report", "some_dir", "--bogus"], "tcompare report: error: unrecognized arguments: --bogus"),
    (["nonsense"], "tcompare: error: argument COMMAND"),
    (["generate", "--run", "/nonexistent/run"], "tcompare generate: error: run directory /nonexistent/run does not exist"),
    (["eval", "--run", "/nonexistent/run"], "tcompare eval: error: run directory /nonexistent/run does not exist"),
    (["train", "--resume", "/nonexistent/run"], "tcompare train: error: cannot resume /nonexistent/run: run directory"),
])
def test_an_error_is_one_line_naming_its_command(argv, prefix, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err


def test_list_writes_defaults_as_a_config_would(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "kv_heads: int | null >= 1 = null" in listed and "use_sdpa: bool = false" in listed
    assert not any(f"= {python}" in listed for python in ("None", "False", "True", "'"))


def test_a_directory_that_is_not_a_finished_run_is_named(tmp_path, capsys):
    assert main(["generate", "--run", str(tmp_path), "--prompt", "a"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tcompare generate: error: {tmp_path} is not a finished tcompare run: config.yaml is missing")


def test_version_names_the_package_torch_and_python(capsys):
    pyproject = (Path(CONFIG).parents[1] / "pyproject.toml").read_text()  # tomllib is Python 3.11+
    project = re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"tcompare {project} (torch {torch.__version__}, Python {platform.python_version()})")
