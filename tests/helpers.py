"""Shared helpers for end-to-end tests: a tiny corpus and a tiny, fast config."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine.",
    "all that glitters is not gold.",
    "to be or not to be, that is the question.",
    "the rain in spain stays mainly in the plain.",
]


def write_corpus(folder: Path, repeats: int = 120) -> Path:
    """A small deterministic text file that a tiny model can learn something from."""
    lines = [SENTENCES[(i * 7) % len(SENTENCES)] for i in range(repeats * len(SENTENCES))]
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(folder: Path, **sections: dict) -> Path:
    """Write a config for a ~10k-parameter model that trains in about a second; sections override."""
    config = {
        "model": {"d_model": 32, "num_heads": 4, "num_layers": 1, "context_length": 16},
        "training": {
            "batch_size": 4, "max_steps": 12, "warmup_steps": 2, "eval_interval": 6, "eval_batches": 2,
            "checkpoint_interval": 4, "seed": 7, "device": "cpu",
        },
        "data": {"dataset": str(write_corpus(folder)), "cache_dir": str(folder / "cache")},
        "logging": {"wandb": "disabled", "log_interval": 2, "progress": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m transformer_comparison ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "transformer_comparison", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and the rows of a CSV file the project wrote."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)
