"""What may change when a run is resumed, and the run's identity that its checkpoints must match.

A resume continues the same training: the same model, data, optimiser and batches. Only keys that
say how long to train, how often to evaluate, log and checkpoint, and where to run may change:

    training.max_steps  training.num_epochs  training.time_budget_seconds  training.flop_budget
    training.eval_interval  training.checkpoint_interval  training.device  training.compile
    logging.*  data.cache_dir

Everything else is "identity config": `flat_config` lists it by dotted key, `config_hash` hashes it
(written to run.json and into every checkpoint), and `check_overrides` refuses a resume override of
any of it by name, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from transformer_comparison.errors import UserError

RESUMABLE_KEYS = frozenset({
    "training.max_steps", "training.num_epochs", "training.time_budget_seconds", "training.flop_budget", "training.eval_interval",
    "training.checkpoint_interval", "training.device", "training.compile", "data.cache_dir",
})
RESUMABLE_SECTIONS = frozenset({"logging"})


def may_change_on_resume(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.split(".", 1)[0] in RESUMABLE_SECTIONS


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def flat_config(cfg: BaseModel, identity_only: bool = True) -> dict[str, Any]:
    """The config as {dotted key: JSON value}; with identity_only, without the keys a resume may change."""
    flat = flatten(cfg.model_dump(mode="json"))
    return {key: value for key, value in flat.items() if not (identity_only and may_change_on_resume(key))}


def config_hash(cfg: BaseModel) -> str:
    """sha256 (first 16 hex digits) of the identity config: equal for every resume of one run."""
    text = json.dumps(flat_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(before: BaseModel, after: BaseModel) -> list[str]:
    """The dotted keys whose values differ between two configs (keys in only one of them included)."""
    old, new = flat_config(before, identity_only=False), flat_config(after, identity_only=False)
    return sorted(key for key in old.keys() | new.keys() if old.get(key, _MISSING) != new.get(key, _MISSING))


def check_overrides(saved: BaseModel, resumed: BaseModel) -> list[str]:
    """The keys the resume overrides change (all allowed), or UserError naming the first that may not change."""
    changed = changed_keys(saved, resumed)
    refused = [key for key in changed if not may_change_on_resume(key)]
    if refused:
        values = flat_config(saved, identity_only=False)
        listed = ", ".join(f"{key} (the run's value: {values.get(key)!r})" for key in refused)
        raise UserError(f"--resume cannot change {listed}: it would no longer be the same training; keys that may "
                        f"change on resume: {', '.join(sorted(RESUMABLE_KEYS))}, logging.*")
    return changed


_MISSING = object()
