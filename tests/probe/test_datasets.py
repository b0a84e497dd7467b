"""DIR/train.npz and DIR/test.npz: written atomically, read back exactly, bad files named in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transformer_comparison.errors import UserError
from transformer_comparison.probe.datasets import (
    labels_per_example,
    read_examples,
    read_npz,
    vocab_needed,
    write_examples,
)
from transformer_comparison.probe.mqar import Examples, MQARTask, generate


def test_round_trip(tmp_path: Path):
    task = MQARTask(64, 32, 4)
    train, test = generate(task, 40, 1), generate(task, 10, 2)
    write_examples(tmp_path, train, test)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz", "train.npz"]  # no temporary files left
    back_train, back_test = read_examples(tmp_path)
    for original, back in ((train, back_train), (test, back_test)):
        assert back.inputs.dtype == back.labels.dtype == np.int64
        assert (back.inputs == original.inputs).all() and (back.labels == original.labels).all()
    assert labels_per_example(back_train) == 4
    assert vocab_needed(back_train, back_test) <= 64


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, words", [
    ({"inputs": np.zeros((2, 4), np.int64)}, "no array labels"),
    ({"inputs": np.zeros((2, 4)), "labels": np.zeros((2, 4), np.int64)}, "integer array"),
    ({"inputs": np.zeros((2, 4), np.int64), "labels": np.zeros((2, 5), np.int64)}, "same shape"),
    ({"inputs": np.zeros(4, np.int64), "labels": np.zeros(4, np.int64)}, "2-D"),
    ({"inputs": -np.ones((2, 4), np.int64), "labels": np.zeros((2, 4), np.int64)}, ">= 0"),
    ({"inputs": np.zeros((2, 4), np.int64), "labels": np.full((2, 4), -5, np.int64)}, "-100"),
    ({"inputs": np.zeros((2, 4), np.int64), "labels": np.full((2, 4), -100, np.int64)}, "nothing would be scored"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, arrays, words):
    path = _save(tmp_path / "train.npz", **arrays)
    with pytest.raises(UserError) as error:
        read_npz(path)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_missing_files(tmp_path: Path):
    with pytest.raises(UserError, match="not a directory"):
        read_examples(tmp_path / "nowhere")
    with pytest.raises(UserError, match="train.npz does not exist"):
        read_examples(tmp_path)
    (tmp_path / "train.npz").write_text("not a zip")
    with pytest.raises(UserError, match="cannot read"):
        read_npz(tmp_path / "train.npz")


def test_other_integer_dtypes_are_read_as_int64(tmp_path: Path):
    path = _save(tmp_path / "x.npz", inputs=np.ones((2, 4), np.int32), labels=np.array([[1, -100, -100, -100]] * 2, np.int16))
    examples = read_npz(path)
    assert isinstance(examples, Examples) and examples.inputs.dtype == np.int64 and examples.labels.dtype == np.int64
