"""scripts/gpu_check.sh, the check made for one call of a lent GPU machine, run here as a dry run on the
CPU (so that the first GPU session does not spend its device time on a broken script), and the pins of
the wheels carried there (requirements-gpu.txt)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file, names normalised."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {name.lower().replace("_", "-"): pin for name, pin in (line.split("==") for line in lines if line)}


def check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "WHEELS": str(tmp_path / "no_wheels"), **env}  # a developer's .whl/ holds wheels for the GPU image's Python
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=600)


def test_the_carried_wheels_are_pinned_as_requirements_txt_pins_them():
    carried, required = pins(ROOT / "requirements-gpu.txt"), pins(ROOT / "requirements.txt")
    assert {"pydantic", "pydantic-core", "typing-extensions", "pooch"} <= carried.keys()
    assert {name: required.get(name) for name in carried} == carried
    if version("pydantic") == carried["pydantic"]:  # the pinned pydantic names its own pydantic-core
        assert f"pydantic-core=={carried['pydantic-core']}" in [r.replace("_", "-").replace(" ", "") for r in requires("pydantic")]


@pytest.mark.slow
def test_a_dry_run_runs_every_step_and_keeps_each_benchmarks_csv(tmp_path):
    result = check(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "out" / "check.log").read_text()
    steps = ("1. versions", "2. CUDA tests", "3. flash against SDPA", "4. flash, 16-key tiles", "5. flash, 32-key tiles",
             "6. every kernel", "7. cached decoding")
    assert [line[3:] for line in log.splitlines() if line.startswith("== ") and ": " not in line] == list(steps)
    assert len(re.findall(r"^== .*: ok in \d+ s \(limit \d+ s\)$", log, re.MULTILINE)) == len(steps)
    assert "device cpu (dry run)" in log and "every step passed" in log and "failed" not in log
    kernels = {"flash", "torch_sdpa"}
    expected = {"flash_kernels.csv": kernels, "flash16_kernels.csv": kernels, "flash32_kernels.csv": kernels,
                "all_kernels.csv": kernels, "decode.csv": {"flash", "dot_product"}}
    for name, mechanisms in expected.items():
        rows = list(csv.DictReader((tmp_path / "out" / name).open()))
        assert {row["mechanism"] for row in rows} == mechanisms and {row["status"] for row in rows} == {"ok"}
    tiles = {row["options"] for row in csv.DictReader((tmp_path / "out" / "flash16_kernels.csv").open())}
    assert "block_size=16 use_sdpa=False" in tiles
    # the device tool brings back at most 8 files: the log and the CSVs, not the plots
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(["check.log", *expected])


def test_a_missing_package_stops_the_check_before_its_steps_with_one_line(tmp_path):
    """As on the GPU image without the carried wheels: pydantic cannot be imported."""
    (tmp_path / "shadow" / "pydantic").mkdir(parents=True)
    (tmp_path / "shadow" / "pydantic" / "__init__.py").write_text("raise ImportError('no pydantic here')\n")
    result = check(tmp_path, "--dry-run", PYTHONPATH=str(tmp_path / "shadow"))
    assert result.returncode == 1
    message = (f"gpu_check: {sys.executable} cannot import the project (ImportError: no pydantic here); "
               "run scripts/gpu_wheels.sh here and carry .whl")
    assert result.stderr.strip().splitlines() == [message]
    assert (tmp_path / "out" / "check.log").read_text().strip() == message  # it comes back from the device


def test_wheels_for_another_python_are_one_line_not_a_pip_traceback(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, pin in pins(ROOT / "requirements-gpu.txt").items():  # every pin, tagged for a Python that does not exist
        (wheels / f"{name.replace('-', '_')}-{pin}-cp399-cp399-manylinux_2_17_x86_64.whl").write_bytes(b"")
    result = check(tmp_path, "--dry-run", WHEELS=str(wheels))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gpu_check: installing {wheels} failed (") and line.endswith("wheels for another Python?")


def test_a_wheel_folder_made_before_a_pin_changed_is_named_stale(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "pydantic-2.14.4-py3-none-any.whl").write_bytes(b"")
    result = check(tmp_path, "--dry-run", WHEELS=str(wheels))
    assert result.returncode == 1
    message = result.stderr.strip()
    assert re.fullmatch(rf"gpu_check: {re.escape(str(wheels))} has no wheel of [\w.-]+==[\w.]+ \(requirements-gpu.txt\); "
                        r"run scripts/gpu_wheels.sh again", message), message
    assert " of pydantic==" not in message


@pytest.mark.parametrize("args", [["--gpu"], ["--dry-run", "extra"]])
def test_an_unknown_argument_is_a_usage_error(tmp_path, args):
    result = check(tmp_path, *args)
    assert result.returncode == 2 and result.stderr.startswith("usage: scripts/gpu_check.sh [--dry-run]")
    assert not (tmp_path / "out").exists()
