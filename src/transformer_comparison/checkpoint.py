"""Checkpoints: verified, atomic, and loaded with weights_only=True.

A checkpoint is a dict saved with torch.save: the training state (model, optimiser, RNG, step, ...)
plus

    format        "transformer-comparison-checkpoint-v2"
    run_id        the run it belongs to (RUN/run.json)
    config_hash   the hash of the run's config without the keys a resume may change
    config        that config, flattened to dotted keys, so a mismatch can be named key by key
    digest        sha256 over every tensor's bytes, dtype and shape and every other value, by key

`load_checkpoint` recomputes the digest, so flipped bytes are refused with one line instead of
training on garbage; `check_identity` refuses another run's checkpoint. The file is written through
artifacts.io (temporary file, fsync, rename): a crash or a full disk leaves the previous checkpoint.
Checkpoints of format v1 (before verification existed) still load, unverified.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from transformer_comparison.artifacts.io import write_bytes_atomic
from transformer_comparison.errors import UserError

FORMAT = "transformer-comparison-checkpoint-v2"
LEGACY_FORMAT = "transformer-comparison-checkpoint-v1"
IDENTITY_KEYS = ("run_id", "config_hash", "config")


def save_checkpoint(state: Mapping[str, Any], path: Path, run_id: str | None = None, config_hash: str | None = None,
                    config: Mapping[str, Any] | None = None) -> None:
    """Write `state` with its identity and digest so that a crash at any moment leaves the old or the new file.

    The file is serialised in memory first: a write error (a full disk) is then an OSError that
    artifacts.io turns into a one-line message, never torch's zip-writer error.
    """
    payload = {"format": FORMAT, **state, "run_id": run_id, "config_hash": config_hash, "config": dict(config or {})}
    payload["digest"] = state_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, lambda stream: stream.write(buffer.getbuffer()))


def _load_failure(path: Path, error: Exception) -> str:
    """Why torch.load failed, in a few words: torch's messages run to paragraphs, so the first sentence."""
    if path.stat().st_size == 0:
        return "the file is empty"
    text = str(error).strip()
    if not text:
        return type(error).__name__
    sentence = re.split(r"(?<=\.)\s", text.splitlines()[0], maxsplit=1)[0].rstrip(".")
    return f"{type(error).__name__}: {sentence if len(sentence) <= 120 else sentence[:117] + '...'}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint written by save_checkpoint; anything else is a UserError naming the file."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (zip, pickle, decode and I/O errors: all mean unreadable)
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({_load_failure(path, error)}); "
                        "it cannot be used: start the run again or restore the file") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise UserError(f"{path} is not a transformer-comparison checkpoint (expected format {FORMAT})")
    if state["format"] == FORMAT and state.get("digest") != state_digest(state):
        raise UserError(f"checkpoint {path} is damaged: its contents do not match the checksum written with them; "
                        "it cannot be used: start the run again or restore the file")
    return state


def check_identity(state: Mapping[str, Any], path: Path, run_id: str, config: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of another run, or of this run under a config it was not trained with.

    `config` is the run's flattened config without the keys a resume may change. A key the
    checkpoint does not know (added to the program later) is not a difference.
    """
    if state.get("format") != FORMAT:
        return  # a v1 checkpoint carries no identity
    if state.get("run_id") != run_id:
        raise UserError(f"checkpoint {path} belongs to another run (run id {state.get('run_id')}, this directory's "
                        f"run.json says {run_id}); it was copied here from elsewhere")
    saved = state.get("config") or {}
    for key in sorted(saved.keys() & config.keys()):
        if saved[key] != config[key]:
            raise UserError(f"checkpoint {path} was trained with {key}={saved[key]!r}, but the run's config now says "
                            f"{key}={config[key]!r}; {key} cannot change on resume")


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over everything in `state` but its own "digest" and "format": keys, tensor bytes, dtypes, shapes, values."""
    digest = hashlib.sha256()
    for key in sorted(state, key=str):
        if key not in ("digest", "format"):
            _update(digest, state[key], str(key))
    return digest.hexdigest()


def _update(digest: Any, value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{where}:{tensor.dtype}:{tuple(value.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            _update(digest, value[key], f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _update(digest, item, f"{where}[{index}]")
    else:
        digest.update(f"{where}={value!r};".encode())
