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


# --- scaling for evaluation past the training context ---------------------------------------------

from transformer_comparison.position import build_position  # noqa: E402
from transformer_comparison.position.rope import rope_frequencies, scaled_frequencies  # noqa: E402


def test_position_interpolation_divides_the_positions():
    positions = torch.arange(40)
    linear = Rotary(10000.0, scaling="linear", factor=4.0, trained_context=16).cos_sin(positions, 8, torch.float64)
    plain = Rotary(10000.0).cos_sin(positions / 4.0, 8, torch.float64)
    torch.testing.assert_close(linear, plain)


def test_ntk_scales_the_base_so_the_lowest_frequency_is_interpolated_by_the_factor():
    theta, magnitude = scaled_frequencies(16, 10000.0, "ntk", 4.0, 64)
    plain = rope_frequencies(16, 10000.0)
    assert magnitude == 1.0 and theta[0] == plain[0]  # the highest frequency is kept
    torch.testing.assert_close(theta[-1], plain[-1] / 4.0)  # the lowest, interpolated by exactly the factor
    torch.testing.assert_close(theta, rope_frequencies(16, 10000.0 * 4.0 ** (16 / 14)))


def test_yarn_keeps_short_wavelengths_interpolates_long_ones_and_sets_the_temperature():
    trained = 64
    theta, magnitude = scaled_frequencies(32, 10000.0, "yarn", 8.0, trained)
    plain = rope_frequencies(32, 10000.0)
    ratio = trained * plain / (2 * math.pi)  # training contexts per wavelength
    torch.testing.assert_close(theta[ratio > 32], plain[ratio > 32])
    torch.testing.assert_close(theta[ratio < 1], plain[ratio < 1] / 8.0)
    between = (ratio > 1) & (ratio < 32)
    assert between.any() and ((theta[between] < plain[between]) & (theta[between] > plain[between] / 8.0)).all()
    assert magnitude == pytest.approx(0.1 * math.log(8.0) + 1.0)


def test_scaling_with_factor_one_is_plain_rope_and_scores_stay_relative():
    positions = torch.arange(10)
    torch.testing.assert_close(Rotary(scaling="yarn", factor=1.0, trained_context=8).cos_sin(positions, 8, torch.float64),
                               Rotary().cos_sin(positions, 8, torch.float64))
    rope = Rotary(scaling="yarn", factor=4.0, trained_context=8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    first = Rotary(**{**rope.__dict__, "offset": 3}).rotate_qk(q, k)
    later = Rotary(**{**rope.__dict__, "offset": 11}).rotate_qk(q, k)
    torch.testing.assert_close(first[0] @ first[1].mT, later[0] @ later[1].mT)


def test_rope_encoding_options_are_checked():
    with pytest.raises(ValueError, match="scaling"):
        build_position("rope", scaling="cubic")
    with pytest.raises(ValueError, match="scaling_factor"):
        build_position("rope", scaling="linear", scaling_factor=0.5)
    positions = build_position("rope", scaling="yarn", scaling_factor=2.0).kernel_positions(4, 32)
    assert positions.rope.scaling == "yarn" and positions.rope.trained_context == 32 and positions.alibi_slopes is None
