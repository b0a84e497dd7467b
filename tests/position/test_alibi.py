"""ALiBi slopes (Press et al. 2022): geometric from 2^(-8/n) for n a power of two; otherwise the closest
smaller power of two's slopes, then every other slope of twice that power."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_comparison.position import alibi_bias, alibi_slopes

# Written out by hand from the rule, one head count at a time.
EXPECTED = {
    1: [2**-8],
    2: [2**-4, 2**-8],
    3: [2**-4, 2**-8, 2**-2],
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    5: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1],
    6: [0.25, 0.0625, 0.015625, 0.00390625, 2**-1, 2**-3],
    8: [2.0**-i for i in range(1, 9)],
    12: [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    16: [2 ** (-0.5 * i) for i in range(1, 17)],
}


def paper_slopes(n: int) -> list[float]:
    """The rule as the ALiBi reference code (ofirpress/attention_with_linear_biases) states it."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", sorted(EXPECTED))
def test_hand_written_slopes(heads):
    expected = torch.tensor(EXPECTED[heads], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(heads, dtype=torch.float64), expected)


@pytest.mark.parametrize("heads", range(1, 33))
def test_slopes_for_1_to_32_heads_follow_the_reference_rule(heads):
    slopes = alibi_slopes(heads, dtype=torch.float64)
    assert slopes.shape == (heads,)
    torch.testing.assert_close(slopes, torch.tensor(paper_slopes(heads), dtype=torch.float64), rtol=1e-12, atol=0)
    assert ((slopes > 0) & (slopes < 1)).all() and len(set(slopes.tolist())) == heads


def test_default_dtype_is_float32():
    assert alibi_slopes(4).dtype == torch.float32


def test_zero_heads_are_refused():
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


def test_bias_is_minus_slope_times_distance():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), torch.tensor([2, 3]), torch.arange(4))
    expected = -torch.tensor([[[2.0, 1, 0, 1], [3, 2, 1, 0]]]) * torch.tensor([0.5, 0.25])[:, None, None]
    torch.testing.assert_close(bias, expected)
