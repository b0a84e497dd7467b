"""Weights & Biases logging that never prompts and never blocks.

`logging.wandb`: `auto` (online when a W&B API key is configured, offline otherwise), `online`,
`offline` or `disabled`. The mode is always set in code, because wandb prompts for a key on a
terminal and errors without one otherwise. Offline runs land in RUN/wandb/ and can be uploaded
later with `wandb sync RUN/wandb/offline-run-*`.
"""

from __future__ import annotations

import math
import netrc
import os
from pathlib import Path
from typing import Any

from transformer_comparison.errors import UserError


def wandb_logged_in() -> bool:
    """Whether a W&B API key is configured (environment or ~/.netrc), checked without contacting W&B."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_mode(requested: str) -> str:
    if requested == "auto":
        return "online" if wandb_logged_in() else "offline"
    if requested == "online" and not wandb_logged_in():
        raise UserError("logging.wandb=online needs a W&B login (wandb login, or WANDB_API_KEY); valid otherwise: auto, offline, disabled")
    return requested


def finite_only(values: dict[str, Any]) -> dict[str, Any]:
    """The values W&B can chart: no None, no NaN or infinity."""
    return {key: value for key, value in values.items()
            if value is not None and not (isinstance(value, float) and not math.isfinite(value))}


class WandbLogger:
    """A thin wrapper: `run` is None when logging is disabled or this is not the main process."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    @classmethod
    def start(cls, cfg: Any, run_dir: Path, group: str | None, run_id: str | None, enabled: bool) -> "WandbLogger":
        mode = resolve_mode(cfg.logging.wandb)
        if not enabled or mode == "disabled":
            return cls(None)
        import wandb

        (run_dir / "wandb").parent.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode=mode, silent=True, console="off", init_timeout=60, x_disable_stats=True)
        run = wandb.init(
            project=cfg.logging.project,
            entity=cfg.logging.entity,
            group=group,
            name=run_dir.name,
            dir=str(run_dir),
            config=cfg.model_dump(mode="json"),
            id=run_id,
            resume="allow" if run_id else None,
            settings=settings,
        )
        return cls(run)

    def log_config(self, **extra: Any) -> None:
        if self.run is not None:
            self.run.config.update(extra, allow_val_change=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        values = {key: value for key, value in record.items() if key not in ("step", "attention_entropy")}
        for layer, heads in enumerate(record.get("attention_entropy") or []):
            for head, value in enumerate(heads):
                values[f"attention_entropy/layer{layer}_head{head}"] = value
        self.run.log(finite_only(values), step=record["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        self.run.summary.update(finite_only({key: value for key, value in summary.items() if key != "attention_entropy"}))
        self.run.finish(exit_code=0 if summary["status"] == "completed" else 1)
