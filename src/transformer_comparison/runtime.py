"""Where and how a training process computes: device, DDP rank, autocast, loss scaling, memory.

    rt = setup_runtime(cfg)          # device, rank, world size, autocast dtype (flushes subnormals)
    optimizer = make_adamw(model, cfg, lr, rt.device)   # AdamW as training.adamw says
    with autocast(rt): ...           # the forward pass in rt.autocast_dtype, or as is
    scaler = grad_scaler(rt)         # float16 only: torch.amp.GradScaler; a no-op otherwise

`training.dtype=float16` trains with dynamic loss scaling (torch.amp.GradScaler): float16's
smallest normal number is 6e-5, so without scaling small gradients flush to zero and the model
silently stops learning. bfloat16 has float32's exponent range and needs no scaler, which is why
`auto` picks it where the device supports it; float16 is there for GPUs without bfloat16 (V100, T4).
The scaler's state is saved in checkpoints so that a resumed float16 run scales exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.distributed as dist

from transformer_comparison.config import Config
from transformer_comparison.errors import UserError
from transformer_comparison.numerics import prepare_process


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
    """Pick the device, start DDP when launched by torchrun, choose autocast (bf16 on GPU), flush subnormals,
    keep freed memory in the process (`allocator`)."""
    prepare_process()
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


def make_adamw(model: torch.nn.Module, cfg: Config, learning_rate: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the config's betas, weight decay on matrices only (nanoGPT), and the implementation
    `training.adamw` names. auto: fused on CUDA, the per-parameter loop elsewhere, where foreach is
    slower and fused rounds the update differently (losses differ from the sixth step on; measured
    1 ms of nanoGPT's 33 ms CPU step saved, docs/results.md)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = cfg.training.adamw
    if kind == "auto":
        kind = "fused" if device.type == "cuda" else "for_loop"
    betas = (cfg.training.beta1, cfg.training.beta2)
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=kind == "foreach", fused=kind == "fused")
    except RuntimeError as error:  # e.g. fused on a device without the kernel
        raise UserError(f"training.adamw={cfg.training.adamw} is not available on {device} "
                        f"({str(error).splitlines()[0][:120]}); valid: auto, for_loop, foreach, fused") from None


def autocast(rt: Runtime) -> contextlib.AbstractContextManager:
    if rt.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.autocast_dtype)


def grad_scaler(rt: Runtime) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 autocast; disabled (every call a pass-through) otherwise."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepMemory:
    """Measures the peak memory of what runs inside it (one training step):

    CUDA allocator statistics on GPU; on CPU torch's tensor-level MemTracker (parameters,
    gradients, optimiser state, activations and temporaries), since torch keeps no CPU allocator
    statistics. `bytes` and `method` are set on exit.
    """

    def __init__(self, rt: Runtime, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.rt, self.model, self.optimizer = rt, model, optimizer
        self.bytes, self.method = 0, "not measured"
        self._tracker = None

    def __enter__(self) -> StepMemory:
        if self.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.rt.device)
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            self._tracker = MemTracker()
            self._tracker.track_external(self.model, self.optimizer)
            self._tracker.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(kind, error, tb)
            if kind is None:
                peak = self._tracker.get_tracker_snapshot("peak")
                self.bytes = int(sum(per_device["Total"] for per_device in peak.values()))
                self.method = "MemTracker peak tensor bytes over a training step"
        elif kind is None:
            self.bytes = torch.cuda.max_memory_allocated(self.rt.device)
            self.method = "cuda max_memory_allocated over a training step"
