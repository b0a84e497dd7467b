"""Will it fit? The memory a training step or an evaluation pass needs, estimated before anything runs.

    estimate = training_memory(cfg, vocab_size, micro_batch=16, autocast_dtype=None)
    check_fits(estimate, device, "a training step", advice="lower training.batch_size ...")

The estimate has three parts:

* parameters: counted on a model built on the meta device (no memory is allocated, the RNG is
  untouched), so parameters a mechanism owns are included;
* optimizer state: AdamW's two moments plus the gradients, 3 x the parameter bytes (training only);
* activations: the tensors autograd saves for the backward pass of one micro-batch, recorded by
  `torch.autograd.graph.saved_tensors_hooks` during a forward pass of the fake model, i.e. the
  mechanism's real memory model (an n x n score matrix, a window, a chunk padded to chunk_size).
  Meta tensors compute nothing, but a mechanism's Python loop still runs once per tile, so a
  longer sequence is traced at TRACE_MAX_LENGTH and half of it and extrapolated (`extrapolate`):
  through a n + b n^2 when the memory grows at least linearly, which is exact for activations plus
  score matrices, else through C + a n, exact for a constant part such as a chunk padded to
  chunk_size.

An evaluation pass (no gradients) keeps one layer's intermediates at a time: its activations are
taken as the traced total divided by the number of layers, plus the logits. tests/test_limits.py
holds the training estimate within 25% of MemTracker's measured peak of a real step at the traced
length (dot_product, flash, linear).

`check_fits` refuses (UserError with the estimate and the machine's memory) only when the estimate
exceeds the device's total memory (RAM or cgroup limit on CPU, the GPU's memory on CUDA).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from transformer_comparison.errors import UserError

TRACE_MAX_LENGTH = 256  # longest sequence traced under FakeTensorMode; longer ones are extrapolated
BYTES_FLOAT32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int  # bytes of the weights
    optimizer: int  # bytes of gradients and optimizer state
    activations: int  # bytes of saved activations (training) or live intermediates (evaluation)
    traced: bool  # False: the activations could not be traced and are left out (0)

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.activations

    def describe(self) -> str:
        parts = f"parameters {gib(self.parameters)}, optimizer state {gib(self.optimizer)}, activations {gib(self.activations)}"
        return f"about {gib(self.total)} ({parts})"


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**27 else f"{num_bytes / 2**20:.1f} MiB"


def training_memory(cfg: Any, vocab_size: int, micro_batch: int, autocast_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """Estimated peak memory of one training step of `micro_batch` sequences of the config's context."""
    params, saved = _trace(cfg, vocab_size, micro_batch, cfg.model.context_length, autocast_dtype)
    return MemoryEstimate(params, 3 * params, saved or 0, saved is not None)


def evaluation_memory(cfg: Any, vocab_size: int, batch: int, length: int) -> MemoryEstimate:
    """Estimated peak memory of a no-gradient forward pass over `batch` windows of `length` tokens."""
    params, saved = _trace(cfg, vocab_size, batch, length, None)
    logits = batch * length * vocab_size * BYTES_FLOAT32 * 2  # the logits and their float32 loss copy
    per_layer = None if saved is None else saved // max(1, cfg.model.num_layers)
    return MemoryEstimate(params, 0, logits + (per_layer or 0), per_layer is not None)


@contextlib.contextmanager
def meta_model(cfg: Any, vocab_size: int) -> Iterator[torch.nn.Module]:
    """The config's model on the meta device (shapes, no data, no RNG use), for counting and tracing."""
    from transformer_comparison.model import build_model

    # Meta tensors have shapes and no data. Initialising them would go through torch._refs, whose
    # first use imports torch._dynamo (seconds); their values do not matter, so normal_ is skipped.
    with torch.random.fork_rng(devices=[]), torch.device("meta"), mock.patch.object(torch.nn.init, "normal_", _keep):
        yield build_model(cfg, vocab_size)


def flops_per_token(cfg: Any, vocab_size: int) -> float:
    """The model's training FLOPs per token (GPT.flops_per_token), without building its weights."""
    with meta_model(cfg, vocab_size) as model:
        return float(model.flops_per_token())


def _trace(cfg: Any, vocab_size: int, batch: int, length: int, autocast_dtype: torch.dtype | None) -> tuple[int, int | None]:
    """(parameter bytes, saved-activation bytes at `length` or None when tracing failed)."""
    with meta_model(cfg, vocab_size) as model:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        try:
            traced = min(length, TRACE_MAX_LENGTH)
            at_length = _saved_bytes(model, batch, traced, vocab_size, autocast_dtype)
            if traced == length:
                return params, at_length
            at_half = _saved_bytes(model, batch, traced // 2, vocab_size, autocast_dtype)
            return params, int(extrapolate(traced // 2, at_half, traced, at_length, length))
        except Exception:  # noqa: BLE001  (a mechanism fake tensors cannot run: estimate without activations)
            return params, None


def extrapolate(n1: int, f1: float, n2: int, f2: float, n: int) -> float:
    """Memory at length n from memory f1 at n1 and f2 at n2 = 2 n1: through a n + b n^2 (a, b >= 0)
    when it grows at least linearly (score matrices on top of activations), else through C + a n
    (a constant part: a chunk padded to chunk_size, tables)."""
    assert n2 == 2 * n1
    if f2 >= 2 * f1:
        b = (f2 - 2 * f1) / (n2 * n2 - 2 * n1 * n1)
        a = max(0.0, (f1 - b * n1 * n1) / n1)
        return a * n + b * n * n
    a = max(0.0, (f2 - f1) / (n2 - n1))
    return max(0.0, f1 - a * n1) + a * n


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _saved_bytes(model: torch.nn.Module, batch: int, length: int, vocab_size: int, autocast_dtype: torch.dtype | None) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass (parameters excluded)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    parameters = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # keeps storages alive, so no address is reused within the pass

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        if key not in parameters:
            saved[key] = tensor.untyped_storage().nbytes()
            kept.append(tensor)
        return tensor

    idx = torch.zeros(batch, length, dtype=torch.long, device="meta")
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else _null()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(idx, idx)
    return sum(saved.values())


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def machine_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, description) of the memory `device` has in total."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"{gib(total)} on {torch.cuda.get_device_name(device)}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        return limit, f"{gib(limit)} (this container's memory limit)"
    return total, f"{gib(total)} of RAM"


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def check_fits(estimate: MemoryEstimate, device: torch.device, what: str, advice: str) -> None:
    """UserError when the estimate is more than the device's memory."""
    available, description = machine_memory(device)
    if estimate.total > available:
        raise UserError(f"{what} needs {estimate.describe()}, more than this machine has ({description}); {advice}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocator failure (CPU or CUDA)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))
