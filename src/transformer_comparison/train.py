"""`tcompare train`: train a GPT for one attention mechanism x positional encoding.

Flat on purpose, like nanoGPT's train.py: set up, then one loop. Every batch is a pure function of
(seed, step, micro-step), and the checkpoint holds model, optimiser and RNG state, so `--resume`
reaches exactly the result of an uninterrupted run. Single process or DDP under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from transformer_comparison.attention import ATTENTION_TYPES
from transformer_comparison.checkpoint import load_checkpoint, save_checkpoint
from transformer_comparison.config import Config, kernel_options_for, kv_heads_for, load_config, save_config
from transformer_comparison.data import prepare_data
from transformer_comparison.errors import UserError
from transformer_comparison.model import GPT, GPTConfig
from transformer_comparison.numerics import flush_subnormals
from transformer_comparison.position import POSITION_TYPES
from transformer_comparison.wandb_logging import WandbLogger

EVAL_BATCH_WINDOWS = 64  # validation windows per forward pass
ENTROPY_PROBE_WINDOWS = 8  # validation windows of the fixed attention-entropy probe
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (configs/config.yaml documents every key)")
    parser.add_argument("--attention_type", choices=ATTENTION_TYPES, help="overrides attention.type")
    parser.add_argument("--position_embedding", choices=POSITION_TYPES, help="overrides position.type")
    parser.add_argument("--out", type=Path, help="run directory (default runs/<date>-<attention>-<position>)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR to its configured end")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--wandb_group", help="W&B group (tcompare compare sets one per comparison)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        if args.config or args.attention_type or args.position_embedding or args.out:
            raise UserError("--resume continues a run with its own config; pass only section.key=value overrides")
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"cannot resume {run_dir}: it holds no config.yaml of a tcompare run")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        if args.config is None:
            raise UserError("give --config FILE (or --resume DIR)")
        cfg = load_config(args.config, args.overrides, args.attention_type, args.position_embedding)
        run_dir = args.out or default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
            raise UserError(f"run directory {run_dir} already exists; use --resume {run_dir}, --overwrite, or another --out")
    return train(cfg, run_dir, resume=args.resume is not None, overwrite=args.overwrite, wandb_group=args.wandb_group)


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.attention.type}-{cfg.position.type}"


# ----------------------------------------------------------------------------------------------
# set-up helpers


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    autocast_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device, start DDP when launched by torchrun, choose autocast (bf16 on GPU), flush subnormals."""
    flush_subnormals()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    requested = cfg.training.device
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("training.device=cuda but no CUDA device is available; valid here: auto, cpu")
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("training.device=mps but MPS is not available; valid here: auto, cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype_name = cfg.training.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast_dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
    return Runtime(device, rank, world_size, autocast_dtype)


def build_model(cfg: Config, vocab_size: int) -> GPT:
    return GPT(
        GPTConfig(
            vocab_size=vocab_size,
            context_length=cfg.model.context_length,
            d_model=cfg.model.d_model,
            num_heads=cfg.model.num_heads,
            num_layers=cfg.model.num_layers,
            num_kv_heads=kv_heads_for(cfg),
            dropout=cfg.model.dropout,
            bias=cfg.model.bias,
            attention_type=cfg.attention.type,
            attention_options=kernel_options_for(cfg),
            position_embedding=cfg.position.type,
            rope_base=cfg.position.rope_base,
        )
    )


def make_optimizer(model: GPT, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT), fused on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.training.beta1, cfg.training.beta2)
    return torch.optim.AdamW(groups, lr=cfg.training.learning_rate, betas=betas, fused=device.type == "cuda")


def learning_rate(step: int, cfg: Config, max_steps: int) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_learning_rate at max_steps."""
    t = cfg.training
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
    return t.min_learning_rate + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_learning_rate)


def total_steps(cfg: Config, train_tokens: int) -> int:
    t = cfg.training
    if t.max_steps is not None:
        return t.max_steps
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * cfg.model.context_length
    return max(1, math.ceil(t.num_epochs * train_tokens / tokens_per_step))


def training_batch(tokens: np.ndarray, cfg: Config, step: int, micro: int, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of (step, micro-step): a pure function of the seed, so resumed runs see the same data.

    `training.batch_size` is the global batch; each DDP rank takes its own shard of it.
    """
    ctx, batch = cfg.model.context_length, cfg.training.batch_size
    rng = np.random.default_rng([cfg.training.seed, step, micro])
    starts = rng.integers(0, len(tokens) - ctx - 1, size=batch)[rt.rank :: rt.world_size]
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(ctx + 1)].astype(np.int64))
    return windows[:, :-1].to(rt.device), windows[:, 1:].to(rt.device)


def validation_windows(tokens: np.ndarray, cfg: Config) -> np.ndarray:
    """Start offsets of the fixed validation windows: all non-overlapping context windows, or a fixed sample."""
    ctx = cfg.model.context_length
    starts = np.arange((len(tokens) - 1) // ctx) * ctx
    if len(starts) == 0:
        raise UserError(f"the validation split ({len(tokens)} tokens) is shorter than one context window ({ctx + 1})")
    if cfg.training.eval_batches is not None:
        wanted = cfg.training.eval_batches * cfg.training.batch_size
        if wanted < len(starts):
            starts = np.sort(np.random.default_rng(cfg.training.seed).choice(starts, wanted, replace=False))
    return starts


def windows_to_batch(tokens: np.ndarray, starts: np.ndarray, ctx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(ctx + 1)].astype(np.int64)).to(device)
    return windows[:, :-1], windows[:, 1:]


def autocast(rt: Runtime) -> contextlib.AbstractContextManager:
    if rt.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.autocast_dtype)


@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, starts: np.ndarray, cfg: Config, rt: Runtime) -> float:
    """Mean next-token loss over the fixed validation windows (sharded over ranks, summed exactly)."""
    model.eval()
    ctx = cfg.model.context_length
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss sum, window count
    mine = starts[rt.rank :: rt.world_size]
    for begin in range(0, len(mine), EVAL_BATCH_WINDOWS):
        x, y = windows_to_batch(tokens, mine[begin : begin + EVAL_BATCH_WINDOWS], ctx, rt.device)
        with autocast(rt):
            _, loss, _ = model(x, y)
        total += torch.stack((loss.double() * len(x), torch.tensor(float(len(x)), device=rt.device, dtype=torch.float64)))
    if rt.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def attention_entropy(model: GPT, tokens: np.ndarray, starts: np.ndarray, cfg: Config, rt: Runtime) -> list[list[float]]:
    """Mean entropy (nats) over queries of each layer and head, on a fixed validation probe."""
    model.eval()
    x, _ = windows_to_batch(tokens, starts[:ENTROPY_PROBE_WINDOWS], cfg.model.context_length, rt.device)
    with autocast(rt):
        _, _, entropy = model(x, return_entropy=True)
    model.train()
    return entropy.float().mean(dim=(1, 3)).tolist()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured_step_peak(run_step, rt: Runtime, model: torch.nn.Module, optimizer) -> tuple[int, str]:
    """Run one training step while measuring its peak memory: CUDA allocator statistics on GPU;
    on CPU, torch's tensor-level MemTracker (parameters, gradients, optimiser state, activations and
    temporaries), since torch keeps no CPU allocator statistics."""
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        run_step()
        return torch.cuda.max_memory_allocated(rt.device), "cuda max_memory_allocated over a training step"
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        run_step()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(per_device["Total"] for per_device in peak.values())), "MemTracker peak tensor bytes over a training step"


# ----------------------------------------------------------------------------------------------
# run-directory helpers


class RunFiles:
    """The files of a run directory (docs/architecture.md); only rank 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.dir, self.enabled = run_dir, enabled
        self.checkpoint = run_dir / "checkpoints" / "latest.pt"
        self.metrics = run_dir / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.metrics.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be produced again)."""
        if not self.enabled or not self.metrics.exists():
            return
        kept = [line for line in self.metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(self.metrics, "".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_atomic(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.request)

    def request(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def agreed(self, rt: Runtime) -> bool:
        """Whether to stop; under DDP every rank stops at the same step."""
        flag = torch.tensor(float(self.signum is not None), device=rt.device)
        if rt.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# the training run


def train(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, wandb_group: str | None = None) -> int:
    rt = setup_runtime(cfg)
    torch.manual_seed(cfg.training.seed + rt.rank)
    if rt.world_size > 1 and cfg.training.batch_size % rt.world_size:
        raise UserError(f"training.batch_size ({cfg.training.batch_size}) must be divisible by the {rt.world_size} processes")

    data = prepare_data(cfg.data, cfg.model.vocab_size)
    vocab_size = cfg.model.vocab_size or data.tokenizer.vocab_size
    if vocab_size < data.tokenizer.vocab_size:
        raise UserError(f"model.vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary ({data.tokenizer.vocab_size})")
    if len(data.train) <= cfg.model.context_length + 1:
        raise UserError(f"the training split has {len(data.train)} tokens, fewer than one context window ({cfg.model.context_length + 1})")
    max_steps = total_steps(cfg, len(data.train))
    val_starts = validation_windows(data.val, cfg)

    model = build_model(cfg, vocab_size).to(rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)
    files = RunFiles(run_dir, enabled=rt.is_main)
    state = load_checkpoint(files.checkpoint) if resume and files.checkpoint.exists() else None

    if rt.is_main:
        if overwrite and not resume:
            for stale in ("metrics.jsonl", "summary.json", "checkpoints/latest.pt"):
                (run_dir / stale).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        data.tokenizer.save(run_dir / "tokenizer.json")

    start_step, best_val, carried = 0, math.inf, {"train_time": 0.0, "step_time": 0.0, "timed_steps": 0}
    wandb_id = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if rt.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], rt.device)
        start_step, best_val, wandb_id = state["step"], state["best_val_loss"], state.get("wandb_id")
        carried = {key: state[key] for key in carried}
        files.truncate_metrics_after(start_step)
    elif resume:
        files.truncate_metrics_after(0)

    raw_model = model
    if cfg.training.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    num_parameters = raw_model.num_parameters()
    logger = WandbLogger.start(cfg, run_dir, wandb_group, wandb_id, enabled=rt.is_main)
    logger.log_config(num_parameters=num_parameters, flops_per_token=raw_model.flops_per_token(), dataset=data.fingerprint)
    stop = StopRequest()
    stop.install()

    accumulation = cfg.training.gradient_accumulation_steps
    tokens_per_step = cfg.training.batch_size * accumulation * cfg.model.context_length
    peak_memory, peak_method = 0, "not measured"
    last_loss = torch.zeros((), device=rt.device)
    last_entropy: list[list[float]] = []
    val_loss = math.nan

    def run_step(step: int) -> torch.Tensor:
        lr = learning_rate(step, cfg, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=rt.device)
        for micro in range(accumulation):
            x, y = training_batch(data.train, cfg, step, micro, rt)
            sync = contextlib.nullcontext() if rt.world_size == 1 or micro == accumulation - 1 else model.no_sync()
            with sync:
                with autocast(rt):
                    _, loss, _ = model(x, y)
                (loss / accumulation).backward()
            step_loss += loss.detach() / accumulation
        if cfg.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss

    def checkpoint(step: int) -> None:
        if not rt.is_main:
            return
        save_checkpoint(
            {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
                "step": step,
                "best_val_loss": best_val,
                "wandb_id": logger.run_id,
                **carried,
            },
            files.checkpoint,
        )

    def summary(status: str, step: int, error: str | None = None) -> dict[str, Any]:
        step_time = carried["step_time"] / max(1, carried["timed_steps"])
        return {
            "status": status,
            "error": error,
            "attention_type": cfg.attention.type,
            "position_embedding": cfg.position.type,
            "seed": cfg.training.seed,
            "final_val_loss": val_loss,
            "final_val_perplexity": math.exp(val_loss) if math.isfinite(val_loss) else math.nan,
            "best_val_loss": best_val,
            "tokens_per_second": tokens_per_step / step_time if step_time else math.nan,
            "step_time_ms": 1000 * step_time,
            "peak_memory_bytes": peak_memory,
            "peak_memory_method": peak_method,
            "peak_rss_bytes": peak_rss_bytes(),
            "train_time_seconds": carried["train_time"],
            "attention_entropy": last_entropy,
            "mean_attention_entropy": float(np.mean(last_entropy)) if last_entropy else math.nan,
            "num_parameters": num_parameters,
            "num_kv_heads": kv_heads_for(cfg),
            "flops_per_token": raw_model.flops_per_token(),
            "world_size": rt.world_size,
            "steps": step,
            "max_steps": max_steps,
            "tokens_seen": step * tokens_per_step,
            "device": str(rt.device),
            "torch_version": torch.__version__,
            "dataset": data.fingerprint,
        }

    def finish(status: str, step: int, error: str | None = None) -> None:
        final = summary(status, step, error)
        files.write_summary(final)
        logger.finish(final)
        if rt.world_size > 1:
            dist.destroy_process_group()

    def evaluate_now(step: int) -> None:
        nonlocal val_loss, best_val, last_entropy
        val_loss = evaluate(model, data.val, val_starts, cfg, rt)
        best_val = min(best_val, val_loss)
        last_entropy = attention_entropy(raw_model, data.val, val_starts, cfg, rt)
        record = {
            "step": step,
            "elapsed_seconds": round(carried["train_time"], 3),
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss),
            "attention_entropy": last_entropy,
        }
        files.log(record)
        logger.log(record)

    progress = tqdm(total=max_steps, initial=start_step, disable=not (rt.is_main and cfg.logging.progress), unit="step", dynamic_ncols=True)
    step = start_step
    window_start, window_steps = time.perf_counter(), 0
    time_budget = cfg.training.time_budget_seconds
    while step < max_steps:
        if peak_memory == 0:  # the first step of a process runs under the memory tracker, outside the step timing
            loss_holder: list[torch.Tensor] = []
            peak_memory, peak_method = measured_step_peak(lambda: loss_holder.append(run_step(step)), rt, raw_model, optimizer)
            last_loss = loss_holder[0]
            carried["train_time"] += time.perf_counter() - window_start
            window_start = time.perf_counter()
        else:
            last_loss = run_step(step)
            window_steps += 1
        step += 1
        is_log = step % cfg.logging.log_interval == 0 or step == max_steps
        is_eval = step % cfg.training.eval_interval == 0 or step == max_steps
        interval = cfg.training.checkpoint_interval  # 0: only at the end
        is_checkpoint = (interval > 0 and step % interval == 0) or step == max_steps
        if is_log or is_eval or is_checkpoint:
            loss_value = last_loss.item()  # the only host synchronisation, at these intervals
            now = time.perf_counter()
            elapsed = now - window_start
            carried["train_time"] += elapsed
            carried["step_time"] += elapsed
            carried["timed_steps"] += window_steps
            elapsed = max(elapsed, 1e-9)
            if not math.isfinite(loss_value):
                kept = f"the last good checkpoint is {files.checkpoint}" if files.checkpoint.exists() else "no checkpoint was written"
                message = f"training diverged: loss is {loss_value} at step {step}; {kept}"
                finish("diverged", step, message)
                raise UserError(message)
            if is_log:
                record = {
                    "step": step,
                    "elapsed_seconds": round(carried["train_time"], 3),
                    "train_loss": loss_value,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_second": tokens_per_step * window_steps / elapsed,
                    "step_time_ms": 1000 * elapsed / max(1, window_steps),
                }
                files.log(record)
                logger.log(record)
                progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
            if is_eval:
                evaluate_now(step)
            if is_checkpoint:
                checkpoint(step)
            window_start, window_steps = time.perf_counter(), 0
        progress.update(1)
        if stop.agreed(rt) if rt.world_size > 1 else stop.signum is not None:
            carried["train_time"] += time.perf_counter() - window_start
            checkpoint(step)
            finish("interrupted", step)
            progress.close()
            print(f"interrupted at step {step}; checkpoint saved; continue with: tcompare train --resume {run_dir}", file=sys.stderr)
            return EXIT_INTERRUPTED.get(stop.signum or signal.SIGINT, 130)
        if time_budget is not None and carried["train_time"] + time.perf_counter() - window_start >= time_budget:
            carried["train_time"] += time.perf_counter() - window_start
            evaluate_now(step)
            checkpoint(step)
            break
    progress.close()
    if start_step == max_steps and state is not None:  # resumed a finished run: evaluate it again
        evaluate_now(step)
    finish("completed", step)
    if rt.is_main:
        print(f"{cfg.attention.type} + {cfg.position.type}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}) after {step} steps; run in {run_dir}")
    return 0
