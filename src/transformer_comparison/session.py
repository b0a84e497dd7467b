"""One training process's set-up and state: what `train.py`'s loop works with.

    session, state = start_session(cfg, rt, plan, run, wandb_group)   # seeded model, optimiser, restored checkpoint
    summary = summarise(session, state, "completed")

`TrainState` is what changes as training goes (its CARRIED fields travel in checkpoints);
`Session` is what stays fixed once set up; `StopRequest` turns SIGINT / SIGTERM into a flag the
loop checks after each step.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from transformer_comparison.artifacts.run import RunSummary
from transformer_comparison.config import Config, kv_heads_for
from transformer_comparison.data import PreparedData
from transformer_comparison.errors import UserError
from transformer_comparison.model import GPT, build_model
from transformer_comparison.run_dir import RunDir
from transformer_comparison.runtime import Runtime, grad_scaler, make_adamw, peak_rss_bytes
from transformer_comparison.training_plan import Plan, write_new_run, write_resumed_run
from transformer_comparison.wandb_logging import WandbLogger


@dataclass
class TrainState:
    """What changes as training goes; the `CARRIED` fields travel in checkpoints."""

    step: int = 0
    best_val_loss: float = math.inf
    val_loss: float = math.nan
    entropy: list[list[float]] | None = None
    train_time: float = 0.0  # seconds of training (all processes of the run)
    step_time: float = 0.0  # seconds of timed steps (the first, memory-measured step of each process excluded)
    timed_steps: int = 0
    peak_memory: int = 0
    peak_method: str = "not measured"
    wandb_id: str | None = None

    CARRIED = ("train_time", "step_time", "timed_steps")


@dataclass
class Session:
    """What one training process works with, fixed once it is set up."""

    cfg: Config
    rt: Runtime
    plan: Plan
    run: RunDir | None  # None on DDP ranks other than 0: they write nothing
    model: torch.nn.Module  # what a step calls: compiled and/or DDP-wrapped
    raw_model: GPT
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    logger: WandbLogger

    @property
    def data(self) -> PreparedData:
        return self.plan.data

    @property
    def max_steps(self) -> int:
        return self.plan.max_steps

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.training
        return t.batch_size * t.gradient_accumulation_steps * self.cfg.model.context_length


def restore(s: Session, state: TrainState, checkpoint: dict[str, Any]) -> None:
    """Load a verified checkpoint into the model, optimiser, scaler, RNG and state."""
    try:
        s.raw_model.load_state_dict(checkpoint["model"])
        s.optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"the checkpoint in {s.plan.run_dir} does not fit its config ({str(error).splitlines()[0][:200]})") from None
    if checkpoint.get("scaler"):
        s.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if s.rt.device.type == "cuda" and checkpoint.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng_cuda"], s.rt.device)
    state.step, state.best_val_loss, state.wandb_id = checkpoint["step"], checkpoint["best_val_loss"], checkpoint.get("wandb_id")
    for key in TrainState.CARRIED:
        setattr(state, key, checkpoint[key])


def summarise(s: Session, state: TrainState, status: str, error: str | None = None) -> RunSummary:
    step_time = state.step_time / max(1, state.timed_steps)
    return RunSummary(
        status=status,
        error=error,
        attention_type=s.cfg.attention.type,
        position_embedding=s.cfg.position.type,
        seed=s.cfg.training.seed,
        final_val_loss=state.val_loss,
        final_val_perplexity=math.exp(state.val_loss) if math.isfinite(state.val_loss) else None,
        best_val_loss=state.best_val_loss,
        tokens_per_second=s.tokens_per_step / step_time if step_time else None,
        step_time_ms=1000 * step_time,
        peak_memory_bytes=state.peak_memory,
        peak_memory_method=state.peak_method,
        peak_rss_bytes=peak_rss_bytes(),
        train_time_seconds=state.train_time,
        attention_entropy=state.entropy,
        mean_attention_entropy=float(np.mean(state.entropy)) if state.entropy else None,
        num_parameters=s.raw_model.num_parameters(),
        num_kv_heads=kv_heads_for(s.cfg),
        flops_per_token=s.raw_model.flops_per_token(),
        world_size=s.rt.world_size,
        steps=state.step,
        max_steps=s.max_steps,
        tokens_seen=state.step * s.tokens_per_step,
        device=str(s.rt.device),
        torch_version=torch.__version__,
        dataset=s.data.fingerprint,
        run_id=s.plan.identity.run_id,
        config_hash=s.plan.identity.config_hash,
    )


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self.request)

    def uninstall(self) -> None:
        """Give the signals back to whoever had them (the CLI: KeyboardInterrupt; a caller's own handlers)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def request(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def agreed(self, rt: Runtime) -> bool:
        """Whether to stop; under DDP every rank stops at the same step."""
        if rt.world_size == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def start_session(cfg: Config, rt: Runtime, plan: Plan, run: RunDir | None, wandb_group: str | None) -> tuple[Session, TrainState]:
    """Build the model and optimiser (seeded), restore the checkpoint, write the run's files, start W&B."""
    torch.manual_seed(cfg.training.seed + rt.rank)
    raw_model = build_model(cfg, plan.vocab_size).to(rt.device)
    optimizer = make_adamw(raw_model, cfg, cfg.training.learning_rate, rt.device)
    model: torch.nn.Module = torch.compile(raw_model) if cfg.training.compile else raw_model
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    session = Session(cfg, rt, plan, run, model, raw_model, optimizer, grad_scaler(rt), WandbLogger(None))
    state = TrainState()
    if plan.checkpoint is not None:
        restore(session, state, plan.checkpoint)
    if run is not None:
        if plan.resume:
            write_resumed_run(run, plan, cfg, state.step)
        else:
            write_new_run(run, plan, cfg)
    session.logger = WandbLogger.start(cfg, plan.run_dir, wandb_group, state.wandb_id, enabled=rt.is_main)
    session.logger.log_config(num_parameters=raw_model.num_parameters(), flops_per_token=raw_model.flops_per_token(),
                              dataset=plan.data.fingerprint)
    return session, state


