"""RoPE rotates pairs (i, i + d/2): norms are preserved and <rope(q, m), rope(k, n)> depends on m - n only."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_comparison.position import Rotary, apply_rope


def rope_at(x: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """Rotate a (d,) vector as if it sat at `position`."""
    return apply_rope(x.view(1, 1, 1, -1), torch.tensor([position]), base).view(-1)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(-5000, 5000),
    half_dim=st.integers(1, 16), seed=st.integers(0, 2**16),
)
def test_scores_depend_on_the_relative_position_only(m, n, shift, half_dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2 * half_dim, generator=g, dtype=torch.float64)
    shift = max(shift, -min(m, n))
    score = rope_at(q, m) @ rope_at(k, n)
    shifted = rope_at(q, m + shift) @ rope_at(k, n + shift)
    assert shifted.item() == pytest.approx(score.item(), rel=1e-9, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(position=st.integers(0, 100000), half_dim=st.integers(1, 32), seed=st.integers(0, 2**16))
def test_rotation_preserves_norms(position, half_dim, seed):
    x = torch.randn(2 * half_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert rope_at(x, position).norm().item() == pytest.approx(x.norm().item(), rel=1e-12)


def test_scores_do_change_with_the_distance():
    q, k = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = {round((rope_at(q, 10) @ rope_at(k, 10 - d)).item(), 9) for d in range(5)}
    assert len(scores) == 5


def test_hand_checked_rotation_of_the_rotate_half_pairs():
    # head_dim 4: pairs (0, 2) at angle p and (1, 3) at angle p / 10000^(2/4) = p / 100
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    p = 2
    a, b = p, p / 100
    expected = torch.tensor(
        [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
         1 * math.sin(a) + 3 * math.cos(a), 2 * math.sin(b) + 4 * math.cos(b)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(rope_at(x, p), expected)
    torch.testing.assert_close(rope_at(x, 0), x)


def test_rotary_puts_queries_at_the_last_key_positions_and_honours_the_offset():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    rq, rk = Rotary(500.0, offset=5).rotate_qk(q, k)
    torch.testing.assert_close(rq, apply_rope(q, torch.arange(9, 12), 500.0))
    torch.testing.assert_close(rk, apply_rope(k, torch.arange(5, 12), 500.0))


def test_odd_head_dim_and_wrong_rank_are_refused():
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 1, 2, 5))
    with pytest.raises(ValueError, match="batch, heads, n, head_dim"):
        apply_rope(torch.randn(2, 4))
