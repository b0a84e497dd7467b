"""Everything `tcompare train` checks before it writes a byte, and the first writes after that.

    plan = plan_training(cfg, run_dir, resume, rt)   # data, steps, resume compatibility, memory: or UserError
    write_new_run(run, plan, cfg)                    # run.json, tokenizer.json, config.yaml
    write_resumed_run(run, plan, cfg, step)          # config.yaml (if the overrides changed it), metrics truncated

A resume is checked against what the run was created with (run.json) and what its checkpoint was
trained with, in this order, so that a refused resume changes nothing:

1. the overrides change only keys that may change on resume (resume.py lists them);
2. the data: same dataset fingerprint (sha256 of the text, split, token counts) and tokenizer;
3. the checkpoint: its checksum, its run id (run.json's), its config (key by key), and
   training.max_steps not below its step.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from transformer_comparison.artifacts import run as artifacts
from transformer_comparison.artifacts.run import DatasetFingerprint, RunIdentity
from transformer_comparison.checkpoint import check_identity, load_checkpoint
from transformer_comparison.config import Config, load_config, save_config
from transformer_comparison.data import PreparedData, load_tokenizer, prepare_data
from transformer_comparison.errors import UserError
from transformer_comparison.resources import MemoryEstimate, check_fits, flops_per_token, training_memory
from transformer_comparison.resume import check_overrides, config_hash, flat_config
from transformer_comparison.run_dir import RunDir
from transformer_comparison.runtime import Runtime
from transformer_comparison.validation import validation_windows
from transformer_comparison.wandb_logging import resolve_mode

MEMORY_ADVICE = "lower training.batch_size (or raise training.gradient_accumulation_steps), model.context_length or model.d_model"


@dataclass
class Plan:
    """A training run that passed every check, and what it was checked against."""

    run_dir: Path
    resume: bool
    data: PreparedData
    vocab_size: int
    max_steps: int
    val_starts: np.ndarray
    identity: RunIdentity  # the run's (resume) or a new one
    identity_is_new: bool  # run.json must be written
    checkpoint: dict[str, Any] | None  # the verified state to resume from
    config_changes: list[str]  # keys the resume overrides change
    memory: MemoryEstimate
    already_complete: bool = False  # a resume of a finished run: nothing to do


def total_steps(cfg: Config, train_tokens: int, vocab_size: int) -> int:
    """training.max_steps, or the steps of training.num_epochs; no more than training.flop_budget buys."""
    t = cfg.training
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * cfg.model.context_length
    steps = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.num_epochs * train_tokens / tokens_per_step))
    budget = getattr(t, "flop_budget", None)
    if budget is not None:
        per_step = flops_per_token(cfg, vocab_size) * tokens_per_step
        if budget < per_step:
            raise UserError(f"training.flop_budget={budget:g} is less than one training step ({per_step:.3g} FLOPs); raise it")
        steps = min(steps, int(budget // per_step))
    return steps


def plan_training(cfg: Config, run_dir: Path, resume: bool, rt: Runtime) -> Plan:
    """Check the config, data, resume and memory; read, never write (except the data cache)."""
    changes = check_overrides(load_config(run_dir / artifacts.CONFIG_FILE), cfg) if resume else []
    resolve_mode(cfg.logging.wandb)  # logging.wandb=online without a login is refused here, not after writing
    data = prepare_data(cfg.data, cfg.model.vocab_size)
    vocab_size = cfg.model.vocab_size or data.tokenizer.vocab_size
    if vocab_size < data.tokenizer.vocab_size:
        raise UserError(f"model.vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary ({data.tokenizer.vocab_size})")
    if len(data.train) <= cfg.model.context_length + 1:
        raise UserError(f"the training split has {len(data.train)} tokens, fewer than one context window ({cfg.model.context_length + 1})")
    max_steps = total_steps(cfg, len(data.train), vocab_size)
    val_starts = validation_windows(data.val, cfg)

    identity, is_new, checkpoint, complete = new_identity(cfg, data), True, None, False
    if resume:
        identity, is_new = resumed_identity(cfg, data, run_dir)
        checkpoint = verified_checkpoint(run_dir, identity, is_new, cfg, max_steps)
        complete = checkpoint is not None and checkpoint["step"] == max_steps and finished(run_dir, max_steps)
    memory = training_memory(cfg, vocab_size, max(1, cfg.training.batch_size // rt.world_size), rt.autocast_dtype)
    if not complete:
        check_fits(memory, rt.device, "a training step", MEMORY_ADVICE)
    return Plan(run_dir, resume, data, vocab_size, max_steps, val_starts, identity, is_new, checkpoint, changes, memory, complete)


def new_identity(cfg: Config, data: PreparedData) -> RunIdentity:
    return RunIdentity(run_id=uuid.uuid4().hex, created=datetime.now().isoformat(timespec="seconds"),
                       config_hash=config_hash(cfg), config=flat_config(cfg),
                       dataset=DatasetFingerprint(**data.fingerprint), tokenizer_identity=data.tokenizer.identity)


def resumed_identity(cfg: Config, data: PreparedData, run_dir: Path) -> tuple[RunIdentity, bool]:
    """The run's identity from run.json, after checking that the data and config still match it.

    A run written before run.json existed gets a new identity (and its tokenizer.json is checked)."""
    identity, is_new = None, True
    if (run_dir / artifacts.IDENTITY_FILE).exists():
        identity, is_new = artifacts.read_identity(run_dir), False
        now = DatasetFingerprint(**data.fingerprint)
        if now != identity.dataset:
            was, is_ = identity.dataset.model_dump(), now.model_dump()
            key = next(k for k in was if was[k] != is_[k])
            raise UserError(f"the data changed since the run in {run_dir} started: dataset {key} was {was[key]!r}, now "
                            f"{is_[key]!r} ({identity.dataset.dataset}); a resume must train on the same data")
        current = flat_config(cfg)
        for key in sorted(identity.config.keys() & current.keys()):
            if identity.config[key] != current[key]:
                raise UserError(f"{run_dir / artifacts.CONFIG_FILE} says {key}={current[key]!r}, but the run was created "
                                f"with {key}={identity.config[key]!r}; {key} cannot change on resume")
    tokenizer_path = run_dir / artifacts.TOKENIZER_FILE
    if tokenizer_path.exists() and load_tokenizer(tokenizer_path).identity != data.tokenizer.identity:
        raise UserError(f"the data rebuilt from {run_dir / artifacts.CONFIG_FILE} is tokenised differently from the run's "
                        f"{tokenizer_path}: the data changed since the run started, so it cannot be resumed")
    return (new_identity(cfg, data), True) if identity is None else (identity, is_new)


def verified_checkpoint(run_dir: Path, identity: RunIdentity, identity_is_new: bool, cfg: Config, max_steps: int) -> dict[str, Any] | None:
    """The run's checkpoint, verified (checksum, run id, config) and not beyond max_steps; None if there is none."""
    path = run_dir / artifacts.CHECKPOINT_FILE
    if not path.exists():
        return None
    state = load_checkpoint(path)
    if identity_is_new and state.get("run_id") is not None:
        raise UserError(f"{run_dir / artifacts.IDENTITY_FILE} is missing, so {path} cannot be verified as this run's "
                        "checkpoint; restore run.json or start a new run")
    check_identity(state, path, identity.run_id, flat_config(cfg))
    if state["step"] > max_steps:
        raise UserError(f"training.max_steps={max_steps} is below the step of the run's checkpoint ({state['step']}): "
                        f"a run cannot go back; give training.max_steps >= {state['step']}")
    return state


def finished(run_dir: Path, max_steps: int) -> bool:
    """Whether summary.json says the run completed all max_steps steps."""
    try:
        summary = artifacts.read_summary(run_dir)
    except UserError:
        return False
    return summary.status == "completed" and summary.steps == max_steps


def write_new_run(run: RunDir, plan: Plan, cfg: Config) -> None:
    """The files of a new run, run.json first (it marks the directory as a run)."""
    artifacts.write_identity(run.path, plan.identity)
    plan.data.tokenizer.save(run.tokenizer)
    save_config(cfg, run.config)


def write_resumed_run(run: RunDir, plan: Plan, cfg: Config, step: int) -> None:
    """What a resume changes once every check passed: config.yaml (only if the overrides changed it),
    metrics after the checkpoint, and run.json for a run written before it existed."""
    if plan.identity_is_new:
        artifacts.write_identity(run.path, plan.identity)
    if not run.tokenizer.exists():
        plan.data.tokenizer.save(run.tokenizer)
    if plan.config_changes:
        save_config(cfg, run.config)
    run.truncate_metrics_after(step)
