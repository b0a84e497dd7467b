"""Process-wide settings of the commands that run models or kernels: subnormals, and the allocator."""

from __future__ import annotations

import torch

from transformer_comparison.allocator import keep_freed_memory


def flush_subnormals() -> None:
    """Flush subnormal floats to zero (x86 FTZ/DAZ), as TensorFlow does by default on CPU.

    ALiBi puts far keys 87 or more below a row's highest score, so their softmax weights fall under
    float32's smallest normal number (1.2e-38); x86 CPUs take ~100x longer for every operation on
    such values. Without flushing, dot_product + ALiBi took 1.7-2x as long as without ALiBi in the
    kernel benchmark at n = 1024-2048 (docs/results.md): an artefact of the CPU, not a cost of the
    mechanism, and GPUs do not pay it. Values that small change no float32 sum they enter. A no-op
    where the CPU has no such mode.
    """
    torch.set_flush_denormal(True)


def prepare_process() -> None:
    """What every command that trains, evaluates or times a model sets first: subnormals flushed and
    freed memory kept for reuse (`allocator.keep_freed_memory`)."""
    flush_subnormals()
    keep_freed_memory()
