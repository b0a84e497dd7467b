"""ALiBi: attention with linear biases (Press, Smith & Lewis 2022, "Train Short, Test Long").

Head h adds -m_h * |i - j| to the score of query i and key j. The slopes m_h are a geometric
sequence starting at 2^(-8/n) with ratio 2^(-8/n) for n heads when n is a power of two. For other n
the paper (and its reference code) takes the slopes of the closest smaller power of two, 2^floor(log2 n),
and fills the remaining heads with every other slope of the sequence for twice that power.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slope_list(num_heads: int) -> list[float]:
    """The ALiBi slopes as plain floats (see the module docstring for the rule)."""
    if num_heads < 1:
        raise ValueError(f"alibi_slopes needs num_heads >= 1, got {num_heads}")
    if num_heads & (num_heads - 1) == 0:
        return _power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return _power_of_two_slopes(closest) + extra


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return the (num_heads,) tensor of ALiBi slopes m_h."""
    return torch.tensor(alibi_slope_list(num_heads), dtype=dtype)


def alibi_bias(slopes: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """The (heads, nq, nk) bias -m_h * |i - j| for the given absolute positions (dense; for small blocks)."""
    distance = (q_positions[:, None] - k_positions[None, :]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance


from transformer_comparison.position.base import KernelPositions, PositionEncoding  # noqa: E402
from transformer_comparison.position.registry import register_position  # noqa: E402


@register_position("alibi")
class ALiBi(PositionEncoding):
    """The kernels receive the slopes; nothing is added to the embeddings; no options."""

    display_order = 2  # where it is listed (tables, CLI help)

    def __init__(self) -> None:
        pass

    def kernel_positions(self, num_heads: int, context_length: int) -> KernelPositions:
        return KernelPositions(alibi_slopes=alibi_slopes(num_heads))
