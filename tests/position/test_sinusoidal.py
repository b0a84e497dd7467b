"""Sinusoidal positions follow Vaswani et al. 2017, section 3.5: even dims sin, odd dims cos."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_comparison.position import sinusoidal_encoding


def vaswani(pos: int, dim_index: int, dim: int) -> float:
    """PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim))."""
    i = dim_index // 2
    angle = pos / 10000 ** (2 * i / dim)
    return math.sin(angle) if dim_index % 2 == 0 else math.cos(angle)


@pytest.mark.parametrize("dim", [1, 2, 5, 8, 33])
def test_every_entry_follows_the_formula(dim):
    table = sinusoidal_encoding(40, dim, dtype=torch.float64)
    assert table.shape == (40, dim)
    expected = torch.tensor([[vaswani(pos, j, dim) for j in range(dim)] for pos in range(40)], dtype=torch.float64)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-12)


def test_hand_checked_values():
    table = sinusoidal_encoding(3, 4, dtype=torch.float64)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    # position 1, dim 4: angles 1 and 1 / 10000^(2/4) = 0.01
    torch.testing.assert_close(
        table[1], torch.tensor([0.8414709848, 0.5403023059, 0.0099998333, 0.9999500004], dtype=torch.float64),
        rtol=0, atol=1e-10,
    )
    assert table[2, 0].item() == pytest.approx(math.sin(2.0))


def test_dtype_and_range():
    table = sinusoidal_encoding(100, 16)
    assert table.dtype == torch.float32
    assert table.abs().max() <= 1.0
    assert sinusoidal_encoding(4, 6, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert sinusoidal_encoding(0, 6).shape == (0, 6)


@pytest.mark.parametrize(("positions", "dim"), [(-1, 4), (4, 0)])
def test_bad_sizes_are_refused(positions, dim):
    with pytest.raises(ValueError):
        sinusoidal_encoding(positions, dim)
