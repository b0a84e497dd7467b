"""shorten_spin_wait: GOMP_SPINCOUNT for tcompare's processes, unless the user chose or torch is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from transformer_comparison.openmp import SPIN_COUNT, shorten_spin_wait


def test_sets_the_spin_count_when_nothing_is_chosen():
    environ: dict[str, str] = {"PATH": "/bin"}
    assert shorten_spin_wait(environ, modules={})
    assert environ == {"PATH": "/bin", "GOMP_SPINCOUNT": str(SPIN_COUNT)}


@pytest.mark.parametrize("choice", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_a_users_choice_is_kept(choice):
    environ = dict(choice)
    assert not shorten_spin_wait(environ, modules={})
    assert environ == choice


def test_too_late_once_torch_is_loaded():
    environ: dict[str, str] = {}
    assert not shorten_spin_wait(environ, modules={"torch": object()})
    assert environ == {}


CHILD = """
import os, sys
if sys.argv[1] == "torch_first":
    import torch
from transformer_comparison.cli import main
main(["list"])
print("GOMP_SPINCOUNT=" + os.environ.get("GOMP_SPINCOUNT", "unset"))
"""


@pytest.mark.parametrize(("order", "expected"), [("cli_first", str(SPIN_COUNT)), ("torch_first", "unset")])
def test_the_command_line_sets_it_before_torch_loads(order, expected):
    env = {name: value for name, value in os.environ.items() if name not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", CHILD, order], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"GOMP_SPINCOUNT={expected}"
