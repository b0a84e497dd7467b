"""CUDA paths (run by scripts/gpu_check.sh on a GPU machine; skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.attention.checks import kernel_extras
from tests.helpers import tiny_config
from transformer_comparison.attention import ATTENTION_TYPES, build_attention
from transformer_comparison.cli import main
from transformer_comparison.position import Rotary, alibi_slopes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_kernel_on_cuda_matches_cpu(name):
    options = {"local": {"window": 7}, "sparse": {"top_k": 5}, "flash": {"block_size": 16}}.get(name, {})
    attn = build_attention(name, **options)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 16, generator=g) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    slopes = alibi_slopes(4)
    extra = kernel_extras(attn, 2, 4, 16, 50, torch.float32)
    cpu = attn(q, k, v, causal=True, alibi_slopes=slopes, rope=Rotary(), **extra)
    gpu = attn(q.cuda(), k.cuda(), v.cuda(), causal=True, alibi_slopes=slopes.cuda(), rope=Rotary(),
               **{key: t.cuda() for key, t in extra.items()})
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_bf16_on_cuda_is_finite(name):
    attn = build_attention(name)
    q, k, v = (torch.randn(1, 4, 300, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    extra = {key: t.cuda().bfloat16() for key, t in kernel_extras(attn, 1, 4, 32, 300, torch.float32).items()}
    out = attn(q, k, v, causal=True, alibi_slopes=alibi_slopes(4).cuda(), **extra)
    out.float().square().sum().backward()
    assert torch.isfinite(out.float()).all() and all(torch.isfinite(t.grad.float()).all() for t in (q, k, v))


def test_training_on_cuda_with_bf16_autocast_reports_cuda_memory(tmp_path):
    config = tiny_config(tmp_path, training={"device": "cuda", "dtype": "auto", "max_steps": 6})
    assert main(["train", "--config", str(config), "--position_embedding", "rope", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["peak_memory_bytes"] > 0
    assert "cuda" in summary["peak_memory_method"]
