from __future__ import annotations

import pytest
import torch

from transformer_comparison.position import alibi_slopes


def make_qkv(batch: int, heads: int, kv_heads: int, n: int, head_dim: int = 8, seed: int = 0, dtype=torch.float64):
    """Random q, k, v that require grad, in float64 for tight tolerances."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, head_dim, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, n, head_dim, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, n, head_dim, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


@pytest.fixture
def qkv_factory():
    return make_qkv


@pytest.fixture
def slopes4():
    return alibi_slopes(4, dtype=torch.float64)
