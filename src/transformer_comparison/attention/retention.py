"""Retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models", arXiv:2307.08621).

Linear attention without a feature map, with a fixed decay gamma_h per head:

    recurrent:  S_t = gamma_h S_{t-1} + k_t^T v_t,      o_t = (q_t / sqrt(d)) S_t
    parallel:   O = ((Q K^T / sqrt(d)) * D) V,          D_tj = gamma_h^(t - j) for j <= t, else 0

with the paper's multi-scale schedule gamma_h = 1 - 2^(-5 - h), h = 0 .. H - 1 (as its code builds it
for H heads: head 0 forgets within ~32 tokens, head h within ~2^(5+h)). The 1/sqrt(d) scaling is the
paper's (and flash-linear-attention's). The paper rotates q and k by xPos-like angles: that is
`rope` here; without RoPE the decay is retention's only sense of order. Each head's output is
divided by its RMS when `output_norm` is on: the paper normalises each head with GroupNorm,
flash-linear-attention's RetNet with an RMSNorm; their gain is absorbed by the model's output
projection. Under such a normalisation the paper's parallel-form normalisers cancel, so there are none.

Training: the paper's chunk-wise form (`recurrent.chunked_linear_scalar_decay`): inside a chunk of
C positions the masked C x C decay matrix, across chunks the state S decayed by gamma^C per chunk.
Time O(n C d + n d^2), memory O(n C + (n/C) d^2) per head. Decoding (`decode`): S (d x d per head)
and the position, O(d^2) per token whatever the context.

Positions: RoPE rotates the scaled q and k at their absolute positions, so q_t . k_j depends on
t - j. ALiBi multiplies every weight by exp(-m_h (t - j)) (its bias taken out of the exponent):
the decay becomes gamma_h exp(-m_h). Grouped kv heads: k and v are expanded to the query heads
(the state is per query head, since each head decays at its own rate). There is no attention
distribution, so the entropy is None (`has_entropy = False`).
"""

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from transformer_comparison.attention.recurrent import (
    RecurrentKernel,
    alibi_log_decay,
    check_common_options,
    check_extras,
    chunk_counts,
    chunked_linear_scalar_decay,
    linear_step,
)
from transformer_comparison.attention.registry import register_attention


def retention_log_decays(heads: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """log gamma_h = log(1 - 2^(-5 - h)) for h = 0 .. heads - 1, computed in float64: (heads,)."""
    exponents = -5.0 - torch.arange(heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(exponents)).to(dtype)


@register_attention("retention")
class Retention(RecurrentKernel):
    """RetNet's multi-scale retention, chunk-wise in training and recurrent when decoding.

    chunk_size: positions per chunk of the chunk-wise form. output_norm: RMS-normalise each head's output.
    """

    display_order = 6  # where it is listed (tables, CLI help)

    def __init__(self, *, chunk_size: Annotated[int, Field(ge=1)] = 64, output_norm: bool = True) -> None:
        self.chunk_size, self.output_norm = check_common_options("retention", chunk_size, output_norm)

    def gates(self, extra: dict[str, Tensor], alibi_slopes: Tensor | None, q: Tensor, n: int) -> dict[str, Tensor]:
        check_extras(self.name, extra, {})
        log_decay = retention_log_decays(q.shape[1], q.dtype, q.device).view(1, -1, 1)
        alibi = alibi_log_decay(alibi_slopes)
        if alibi is not None:
            log_decay = log_decay + alibi
        return {"log_decay": log_decay}  # (1, H, 1): the same at every position

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return chunked_linear_scalar_decay(q, k, v, gates["log_decay"], self.chunk_size, state)

    def step(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return linear_step(q, k, v, gates["log_decay"], state)

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        """Chunk-wise form over the nk keys (queries are padded to them): per chunk Q K^T and its
        product with V (2 x 2 C^2 d), the chunk's state K^T V and the state's read-out Q S (2 x 2 C d^2),
        and the decayed state update (2 d^2)."""
        chunk, chunks, padded = chunk_counts(nk, self.chunk_size)
        d = head_dim
        return float(batch * heads * (4 * padded * chunk * d + 4 * padded * d * d + 2 * chunks * d * d))

