"""Checkpoints: a checksum over every tensor, the run's identity, atomic writes, a full disk said plainly."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from transformer_comparison.artifacts import io as artifacts_io
from transformer_comparison.checkpoint import LEGACY_FORMAT, check_identity, load_checkpoint, save_checkpoint, state_digest
from transformer_comparison.errors import UserError


def state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "step": 7, "best_val_loss": 1.5, "half": torch.ones(3, dtype=torch.bfloat16), "flag": torch.tensor(True)}


def test_a_checkpoint_round_trips_with_its_identity(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint(state(), path, "run-a", "hash", {"model.d_model": 8})
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["run_id"] == "run-a" and loaded["config"] == {"model.d_model": 8}
    assert torch.equal(loaded["model"]["weight"], state()["model"]["weight"])
    check_identity(loaded, path, "run-a", {"model.d_model": 8, "model.new_key": 1})  # a key it does not know is fine
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


@pytest.mark.parametrize("change", ["weight", "optimizer", "step", "rng"])
def test_the_digest_covers_every_part_of_the_state(change):
    original, changed = state(), state()
    if change == "weight":
        changed["model"]["weight"].view(-1)[5] += 1e-7
    elif change == "optimizer":
        changed["optimizer"]["state"][0]["exp_avg"].view(-1)[0] *= -1
    elif change == "step":
        changed["step"] = 8
    else:
        changed["rng_cpu"][100] ^= 1
    assert state_digest(original) == state_digest(state()) != state_digest(changed)


def test_identity_mismatches_are_refused_naming_what_differs(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint(state(), path, "run-a", "hash", {"model.d_model": 8, "training.seed": 1})
    loaded = load_checkpoint(path)
    with pytest.raises(UserError, match="belongs to another run"):
        check_identity(loaded, path, "run-b", {"model.d_model": 8})
    with pytest.raises(UserError, match=r"model.d_model=8.*model.d_model=16"):
        check_identity(loaded, path, "run-a", {"model.d_model": 16, "training.seed": 1})


def test_a_checkpoint_of_the_old_format_loads_unverified(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": LEGACY_FORMAT, **state()}, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    check_identity(loaded, path, "any run", {"model.d_model": 99})  # nothing to compare against


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x80\x02" + bytes(range(40, 120)),
                                     b"PK\x03\x04" + bytes(range(256)) * 4])
def test_garbage_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "latest.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    reason = message[message.index(" unreadable (") + len(" unreadable (") : message.index("); it cannot")]
    assert len(reason) <= 140 and ". " not in reason, reason  # torch's paragraphs cut to their first sentence
    assert (reason == "the file is empty") == (content == b"")


def test_a_full_disk_is_said_and_the_previous_checkpoint_is_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint(state(), path, "run-a", "hash", {})
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts_io.os, "fsync", full)
    bigger = {**state(), "step": 8}
    with pytest.raises(UserError) as error:
        save_checkpoint(bigger, path, "run-a", "hash", {})
    message = str(error.value)
    assert "disk is full" in message and str(path) in message and "intact" in message
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]


def test_files_written_atomically_have_ordinary_permissions(tmp_path):
    path = Path(tmp_path / "x.json")
    artifacts_io.write_text_atomic(path, "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
