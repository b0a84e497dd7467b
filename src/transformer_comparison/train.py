"""`tcompare train`: train a GPT for one attention mechanism x positional encoding.

Flat on purpose, like nanoGPT's train.py: check everything, set up, then one loop that calls
`train_step`, `evaluate_now` and `save_training_checkpoint`. Every batch is a pure function of
(seed, step, micro-step), and the checkpoint holds model, optimiser, loss-scaler and RNG state, so
`--resume` reaches exactly the result of an uninterrupted run. Single process or DDP under torchrun.

Order of work (docs/guarantees.md): validate the config, data, resume and memory before anything
is written; lock the run directory (one writer at a time); write; train. A new run that fails
before its first step is removed again (an --overwrite'n run restored).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from transformer_comparison.artifacts.run import EvalRecord, MetricRecord, TrainRecord
from transformer_comparison.attention import registered_names
from transformer_comparison.checkpoint import save_checkpoint
from transformer_comparison.config import Config, load_config
from transformer_comparison.errors import UserError
from transformer_comparison.position import position_names
from transformer_comparison.resources import MemoryEstimate, is_out_of_memory
from transformer_comparison.resume import flat_config
from transformer_comparison.run_dir import RunDir, check_run_path, contents, is_run_directory
from transformer_comparison.runtime import Runtime, StepMemory, autocast, setup_runtime
from transformer_comparison.session import Session, StopRequest, TrainState, start_session, summarise
from transformer_comparison.training_plan import plan_training
from transformer_comparison.validation import attention_entropy, evaluate

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (configs/config.yaml documents every key)")
    parser.add_argument("--attention_type", choices=registered_names(), help="overrides attention.type")
    parser.add_argument("--position_embedding", choices=position_names(), help="overrides position.type")
    parser.add_argument("--out", type=Path, help="run directory (default runs/<date>-<attention>-<position>)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR to its configured end")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in an existing run directory")
    parser.add_argument("--wandb_group", help="W&B group (tcompare compare sets one per comparison)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        if args.config or args.attention_type or args.position_embedding or args.out or args.overwrite:
            raise UserError("--resume continues a run with its own config; pass only section.key=value overrides")
        run_dir = args.resume
        check_run_path(run_dir, "--resume")
        if not run_dir.exists():
            raise UserError(f"cannot resume {run_dir}: run directory {run_dir} does not exist")
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"cannot resume {run_dir}: it holds no config.yaml of a tcompare run")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        if args.config is None:
            raise UserError("give --config FILE (or --resume DIR)")
        cfg = load_config(args.config, args.overrides, args.attention_type, args.position_embedding)
        run_dir = args.out or default_run_dir(cfg)
        check_run_path(run_dir)
        if contents(run_dir) and not args.overwrite:  # checked again under the lock; this saves preparing data
            raise UserError(f"run directory {run_dir} already exists; use --resume {run_dir}, --overwrite, or another --out")
        if contents(run_dir) and not is_run_directory(run_dir):
            raise UserError(f"--overwrite replaces only run directories, and {run_dir} is not one; choose another --out")
    return train(cfg, run_dir, resume=args.resume is not None, overwrite=args.overwrite, wandb_group=args.wandb_group)


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.attention.type}-{cfg.position.type}"


# ----------------------------------------------------------------------------------------------
# the pieces of a step


def learning_rate(step: int, cfg: Config, max_steps: int) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_learning_rate at max_steps."""
    t = cfg.training
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
    return t.min_learning_rate + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_learning_rate)


def training_batch(tokens: np.ndarray, cfg: Config, step: int, micro: int, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of (step, micro-step): a pure function of the seed, so resumed runs see the same data.

    `training.batch_size` is the global batch; each DDP rank takes its own shard of it.
    """
    ctx, batch = cfg.model.context_length, cfg.training.batch_size
    rng = np.random.default_rng([cfg.training.seed, step, micro])
    starts = rng.integers(0, len(tokens) - ctx - 1, size=batch)[rt.rank :: rt.world_size]
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(ctx + 1)].astype(np.int64))
    return windows[:, :-1].to(rt.device), windows[:, 1:].to(rt.device)


def train_step(s: Session, step: int) -> torch.Tensor:
    """One optimiser step (all micro-steps); returns the mean loss as a tensor (no host sync)."""
    lr = learning_rate(step, s.cfg, s.max_steps)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    accumulation = s.cfg.training.gradient_accumulation_steps
    step_loss = torch.zeros((), device=s.rt.device)
    for micro in range(accumulation):
        x, y = training_batch(s.data.train, s.cfg, step, micro, s.rt)
        sync = contextlib.nullcontext() if s.rt.world_size == 1 or micro == accumulation - 1 else s.model.no_sync()
        with sync:
            with autocast(s.rt):
                _, loss, _ = s.model(x, y)
            s.scaler.scale(loss / accumulation).backward()
        step_loss += loss.detach() / accumulation
    if s.cfg.training.grad_clip > 0:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.training.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss


def log_record(s: Session, record: MetricRecord) -> None:
    if s.run is not None:
        s.run.append_metric(record)
    s.logger.log(record.model_dump())


def log_training(s: Session, state: TrainState, loss_value: float, window_steps: int, elapsed: float) -> TrainRecord:
    record = TrainRecord(
        step=state.step,
        elapsed_seconds=round(state.train_time, 3),
        train_loss=loss_value,
        lr=s.optimizer.param_groups[0]["lr"],
        tokens_per_second=s.tokens_per_step * window_steps / elapsed,
        step_time_ms=1000 * elapsed / max(1, window_steps),
    )
    log_record(s, record)
    return record


def evaluate_now(s: Session, state: TrainState) -> None:
    """Validation loss and attention entropy at the current step, logged."""
    state.val_loss = evaluate(s.model, s.data.val, s.plan.val_starts, s.cfg, s.rt)
    state.best_val_loss = min(state.best_val_loss, state.val_loss)
    state.entropy = attention_entropy(s.raw_model, s.data.val, s.plan.val_starts, s.cfg, s.rt)
    log_record(s, EvalRecord(step=state.step, elapsed_seconds=round(state.train_time, 3), val_loss=state.val_loss,
                             val_perplexity=math.exp(state.val_loss), attention_entropy=state.entropy))


def save_training_checkpoint(s: Session, state: TrainState) -> None:
    """checkpoints/latest.pt with everything a resume needs, tagged with the run's identity."""
    if s.run is None:
        return
    training_state = {
        "model": s.raw_model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scaler": s.scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(s.rt.device) if s.rt.device.type == "cuda" else None,
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "wandb_id": s.logger.run_id,
        **{key: getattr(state, key) for key in TrainState.CARRIED},
    }
    save_checkpoint(training_state, s.run.checkpoint, s.plan.identity.run_id, s.plan.identity.config_hash,
                    flat_config(s.cfg))
    s.run.drop_replaced()


def finish(s: Session, state: TrainState, status: str, error: str | None = None) -> None:
    """summary.json (never replacing a completed one with a worse-informed one), W&B, DDP teardown."""
    summary = summarise(s, state, status, error)
    if s.run is not None:
        s.run.write_summary(summary)
        s.run.drop_replaced()
    s.logger.finish(summary.model_dump())
    if s.rt.world_size > 1:
        dist.destroy_process_group()


def out_of_memory(error: BaseException, step: int, estimate: MemoryEstimate, run_dir: Path) -> UserError:
    return UserError(f"out of memory in training step {step + 1} ({' '.join(str(error).split())[:120]}); the estimate was "
                     f"{estimate.describe()}; lower training.batch_size, model.context_length or model.d_model "
                     f"(the last checkpoint in {run_dir}, if any, is intact)")


# ----------------------------------------------------------------------------------------------
# the training run


def train(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, wandb_group: str | None = None) -> int:
    rt = setup_runtime(cfg)
    if rt.world_size > 1 and cfg.training.batch_size % rt.world_size:
        raise UserError(f"training.batch_size ({cfg.training.batch_size}) must be divisible by the {rt.world_size} processes")
    run = RunDir.claim(run_dir, resume=True) if resume and rt.is_main else None  # a resume reads under the lock
    try:
        plan = plan_training(cfg, run_dir, resume, rt)  # every check; nothing written yet
        if plan.already_complete:
            print(f"{run_dir} is already complete ({plan.max_steps} steps); nothing to do", file=sys.stderr)
            return 0
        if not resume and rt.is_main:
            run = RunDir.claim(run_dir, resume=False, overwrite=overwrite)
        try:
            session, state = start_session(cfg, rt, plan, run, wandb_group)
            return train_loop(session, state)
        except BaseException:
            if run is not None and not resume and not (run.checkpoint.exists() or (run_dir / "summary.json").exists()):
                run.roll_back()  # a new run that produced nothing: leave the directory as it was
            raise
    finally:
        if run is not None:
            run.release()


def train_loop(s: Session, state: TrainState) -> int:
    stop = StopRequest()
    stop.install()
    try:
        return run_steps(s, state, stop)
    finally:
        stop.uninstall()


def run_steps(s: Session, state: TrainState, stop: StopRequest) -> int:
    """Train from state.step to the end (or a stop request, or the time budget); write the summary."""
    cfg, rt, max_steps = s.cfg, s.rt, s.max_steps
    start_step = state.step
    progress = tqdm(total=max_steps, initial=start_step, disable=not (rt.is_main and cfg.logging.progress), unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    time_budget = cfg.training.time_budget_seconds
    measured = False
    while state.step < max_steps:
        try:
            if not measured:  # the first step of a process runs under the memory tracker, outside the step timing
                with StepMemory(rt, s.raw_model, s.optimizer) as memory:
                    last_loss = train_step(s, state.step)
                state.peak_memory, state.peak_method, measured = memory.bytes, memory.method, True
                state.train_time += time.perf_counter() - window_start
                window_start = time.perf_counter()
            else:
                last_loss = train_step(s, state.step)
                window_steps += 1
        except Exception as error:
            if is_out_of_memory(error):
                raise out_of_memory(error, state.step, s.plan.memory, s.plan.run_dir) from None
            raise
        state.step += 1
        step = state.step
        is_log = step % cfg.logging.log_interval == 0 or step == max_steps
        is_eval = step % cfg.training.eval_interval == 0 or step == max_steps
        interval = cfg.training.checkpoint_interval  # 0: only at the end
        is_checkpoint = (interval > 0 and step % interval == 0) or step == max_steps
        if is_log or is_eval or is_checkpoint:
            loss_value = last_loss.item()  # the only host synchronisation, at these intervals
            elapsed = time.perf_counter() - window_start
            state.train_time += elapsed
            state.step_time += elapsed
            state.timed_steps += window_steps
            elapsed = max(elapsed, 1e-9)
            if not math.isfinite(loss_value):
                kept = f"the last good checkpoint is {s.run.checkpoint}" if s.run and s.run.checkpoint.exists() else "no checkpoint was written"
                message = f"training diverged: loss is {loss_value} at step {step}; {kept}"
                finish(s, state, "diverged", message)
                raise UserError(message)
            if is_log:
                record = log_training(s, state, loss_value, window_steps, elapsed)
                progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record.tokens_per_second:.0f}", refresh=False)
            if is_eval:
                evaluate_now(s, state)
            if is_checkpoint:
                save_training_checkpoint(s, state)
            window_start, window_steps = time.perf_counter(), 0
        progress.update(1)
        if stop.agreed(rt):
            state.train_time += time.perf_counter() - window_start
            save_training_checkpoint(s, state)
            finish(s, state, "interrupted")
            progress.close()
            print(f"interrupted at step {step}; checkpoint saved; continue with: tcompare train --resume {s.plan.run_dir}", file=sys.stderr)
            return EXIT_INTERRUPTED.get(stop.signum or signal.SIGINT, 130)
        if time_budget is not None and state.train_time + time.perf_counter() - window_start >= time_budget:
            state.train_time += time.perf_counter() - window_start
            evaluate_now(s, state)
            save_training_checkpoint(s, state)
            break
    progress.close()
    if start_step == max_steps:  # resumed a run whose last checkpoint is its end but which has no summary yet
        evaluate_now(s, state)
    finish(s, state, "completed")
    if rt.is_main:
        print(f"{cfg.attention.type} + {cfg.position.type}: val loss {state.val_loss:.4f} "
              f"(perplexity {math.exp(state.val_loss):.2f}) after {state.step} steps; run in {s.plan.run_dir}")
    return 0

