"""Run `tcompare ARGS` in this process and kill it (SIGKILL, no clean-up) at a chosen point of a write.

    python -m tests.fault_runner checkpoint:2 train --resume RUN   # dies half-way through its 2nd checkpoint write
    python -m tests.fault_runner metrics:5 train --resume RUN      # dies half-way through its 5th metrics line

Used by tests/test_fault_injection.py: the production code has no fault hooks; this wrapper swaps
the write functions the trainer calls for ones that write half of their bytes, flush them to the
file and then kill the process, which is what a power cut or kill -9 at that moment leaves behind.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from transformer_comparison import checkpoint
from transformer_comparison.artifacts import run as run_artifacts
from transformer_comparison.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def dying_on_call(number: int, original: Callable[..., Any], tear: Callable[..., Any]) -> Callable[..., Any]:
    """`original` for every call but the `number`-th, which `tear`s the write and dies."""
    calls = [0]

    def wrapped(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == number:
            tear(original, *args)
            die()
        return original(*args)

    return wrapped


def tear_checkpoint(original: Callable[..., Any], path: Any, write: Callable[[Any], Any]) -> None:
    """Write half of the checkpoint's bytes into artifacts.io's temporary file, then (caller) die."""

    def half(stream: Any) -> None:
        buffer = io.BytesIO()
        write(buffer)
        stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        stream.flush()
        die()

    original(path, half)


def tear_metric(original: Callable[..., Any], path: Any, record: Any) -> None:
    """Append half of a metrics line (no newline), flushed."""
    line = record.model_dump_json()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line[: len(line) // 2])
        handle.flush()
        os.fsync(handle.fileno())


def install(fault: str) -> None:
    where, _, number = fault.partition(":")
    if where == "checkpoint":
        checkpoint.write_bytes_atomic = dying_on_call(int(number), checkpoint.write_bytes_atomic, tear_checkpoint)
    elif where == "metrics":
        run_artifacts.append_jsonl = dying_on_call(int(number), run_artifacts.append_jsonl, tear_metric)
    else:
        raise SystemExit(f"unknown fault {fault!r}; valid: checkpoint:N, metrics:N")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
