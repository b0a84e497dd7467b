"""What the benchmarks share: comma-list argument types, the device choice, the one-line status of a
failure, running a case in a fresh process, and the mechanisms' config (options from the registry)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from transformer_comparison.errors import UserError


def comma_list(text: str) -> list[str]:
    """argparse type: 'a, b,a' -> ['a', 'b'] (distinct, in order); empty is an error."""
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise argparse.ArgumentTypeError("is empty; give a comma-separated list")
    return items


def positive_ints(text: str) -> list[int]:
    """argparse type: '1024,512' -> [512, 1024] (sorted, distinct, each >= 1)."""
    values = []
    for item in comma_list(text):
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer; give e.g. 512,1024") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} must be >= 1")
        values.append(value)
    return sorted(set(values))


def choose(names: list[str], valid: tuple[str, ...] | list[str], flag: str) -> list[str]:
    """`names` if every one is in `valid`, else a one-line UserError listing the valid ones."""
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise UserError(f"{flag}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available (use --device cpu)")
    return name


def error_status(error: BaseException) -> str:
    """'oom' for allocation failures, else the error as one line."""
    message = str(error)
    lowered = message.lower()
    if isinstance(error, MemoryError) or "out of memory" in lowered or "can't allocate memory" in lowered:
        return "oom"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}"[:300]


def child_exit_status(returncode: int, stderr: str) -> str:
    """Why a child ended without reporting: killed (by the OOM killer: 'oom'), or its last stderr line."""
    if returncode == -signal.SIGKILL:
        return "oom"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit status {returncode}")[:300]


def run_child(module: str, case: dict[str, Any], prefix: str, timeout: float) -> dict[str, Any]:
    """Run `python -m module --case JSON` and return the JSON of its last `prefix` line, or a status."""
    command = [sys.executable, "-m", module, "--case", json.dumps(case)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return {"status": child_exit_status(proc.returncode, proc.stderr)}


def child_main(description: str, prefix: str, measure: Callable[[dict[str, Any]], dict[str, Any]],
               argv: list[str] | None = None) -> int:
    """The child side of `run_child`: read --case JSON, print one `prefix` result line, never raise."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--case", required=True, help="the case as JSON")
    case = json.loads(parser.parse_args(argv).case)
    try:
        result = measure(case)
    except Exception as error:  # recorded, never raised: the parent reads the status
        result = {"status": error_status(error)}
    print(prefix + json.dumps(result), flush=True)
    return 0


def options_text(options: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in options.items())
