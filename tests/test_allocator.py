"""keep_freed_memory: a block freed and allocated again is reused, not mapped afresh with page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transformer_comparison.allocator import glibc

# A fresh process trains nanoGPT's CPU recipe's model (4 layers, d_model 128, batch 12 x 64) for a few
# steps and prints the minor page faults per step, with or without keep_freed_memory() first.
FAULTS_PER_STEP = """
import resource, sys, torch
from transformer_comparison.allocator import keep_freed_memory
from transformer_comparison.model import GPT, GPTConfig

if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, context_length=64, d_model=128, num_heads=4, num_layers=4))
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 65, (12, 64))

def faults_per_step(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

faults_per_step(5)
print(faults_per_step(10))
"""


def faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(glibc() is None, reason="the C library is not glibc")
def test_training_steps_reuse_freed_activations_instead_of_faulting_them_back():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 200  # glibc unmaps and trims freed activations every step (1,200-3,700 measured alone,
    # 403 once beside a parallel test run: glibc's mmap threshold adapts to what was freed before)
    assert kept < default / 10  # 15-50 measured: the heap's own growth, not the activations


def test_training_processes_set_it(monkeypatch):
    """setup_runtime (train, evaluate's model runs under it) calls it; a no-op result is tolerated."""
    import transformer_comparison.numerics as numerics
    import transformer_comparison.runtime as runtime
    from transformer_comparison.config import validate_config

    calls = []
    monkeypatch.setattr(numerics, "keep_freed_memory", lambda: calls.append(True) or True)
    runtime.setup_runtime(validate_config({"training": {"device": "cpu"}}))
    assert calls == [True]
