"""The probe's data interchange: DIR/train.npz and DIR/test.npz, each with int64 arrays `inputs`
(N, L) and `labels` (N, L), -100 meaning "not scored" (zoology's data-segment convention).

`write_examples` writes both files atomically (artifacts.io: a temporary file in DIR, then os.replace);
`read_examples` checks what it reads and names the problem in one line.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from transformer_comparison.artifacts.io import write_bytes_atomic
from transformer_comparison.errors import UserError
from transformer_comparison.probe.mqar import IGNORE_INDEX, Examples

SPLITS = ("train", "test")


def write_npz(path: Path, examples: Examples) -> None:
    """One split as PATH (.npz with int64 `inputs` and `labels`), replaced atomically."""
    inputs, labels = examples.inputs.astype(np.int64), examples.labels.astype(np.int64)
    write_bytes_atomic(path, lambda stream: np.savez(stream, inputs=inputs, labels=labels))


def write_examples(directory: Path, train: Examples, test: Examples) -> None:
    """DIR/train.npz and DIR/test.npz."""
    write_npz(directory / "train.npz", train)
    write_npz(directory / "test.npz", test)


def read_npz(path: Path) -> Examples:
    """One split, checked: integer `inputs` >= 0 and `labels` (-100 or >= 0), both (N, L), N >= 1."""
    if not path.is_file():
        raise UserError(f"{path} does not exist (--data DIR needs DIR/train.npz and DIR/test.npz)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ("inputs", "labels") if name not in archive.files]
            if missing:
                raise UserError(f"{path} has no array {', '.join(missing)}; it needs int64 arrays inputs and labels "
                                f"(found: {', '.join(archive.files) or 'none'})")
            inputs, labels = archive["inputs"], archive["labels"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read {path} as .npz: {error}") from None
    for name, array in (("inputs", inputs), ("labels", labels)):
        if not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"{path}: {name} must be an integer array (int64), got {array.dtype}")
        if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
            raise UserError(f"{path}: {name} must be 2-D (examples, positions) and non-empty, got shape {array.shape}")
    if inputs.shape != labels.shape:
        raise UserError(f"{path}: inputs {inputs.shape} and labels {labels.shape} must have the same shape")
    if inputs.min() < 0:
        raise UserError(f"{path}: inputs must be token ids >= 0, found {int(inputs.min())}")
    if labels.min() < IGNORE_INDEX or ((labels < 0) & (labels != IGNORE_INDEX)).any():
        raise UserError(f"{path}: labels must be token ids >= 0 or {IGNORE_INDEX} (not scored)")
    if not (labels != IGNORE_INDEX).any():
        raise UserError(f"{path}: every label is {IGNORE_INDEX}; nothing would be scored")
    return Examples(inputs.astype(np.int64), labels.astype(np.int64))


def read_examples(directory: Path) -> tuple[Examples, Examples]:
    """(train, test) from DIR/train.npz and DIR/test.npz."""
    if not directory.is_dir():
        raise UserError(f"--data {directory} is not a directory (it should hold train.npz and test.npz)")
    return read_npz(directory / "train.npz"), read_npz(directory / "test.npz")


def vocab_needed(*splits: Examples) -> int:
    """The smallest vocabulary holding every token of the splits: max id + 1."""
    return int(max(max(int(s.inputs.max()), int(s.labels.max())) for s in splits)) + 1


def labels_per_example(examples: Examples) -> int:
    """Labelled positions per example (the D of MQAR); the rounded mean if they differ."""
    counts = (examples.labels != IGNORE_INDEX).sum(axis=1)
    return int(round(float(counts.mean())))
