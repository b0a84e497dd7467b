"""Dot-product attention (Vaswani et al. 2017, "Attention Is All You Need").

    out = softmax(Q K^T / sqrt(d) + B) V,   B_ij = -m_h |i - j| with ALiBi, -inf where causal hides j > i.

Time O(n^2 d), memory O(n^2) per head: the full score matrix is materialised. This is the reference
every other mechanism is compared with. Grouped K/V heads are read by grouping the queries, never
by copying K and V.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer_comparison.attention.base import (
    AttentionKernel,
    entropy_from_logits,
    group_queries,
    grouped_matmul,
    grouped_slopes,
    query_key_positions,
    rotate_qk,
    ungroup,
)
from transformer_comparison.attention.bias import end_aligned_causal_bias, offsets, position_bias
from transformer_comparison.attention.registry import register_attention
from transformer_comparison.position.rope import Rotary


def dense_scores(q: Tensor, k: Tensor, causal: bool, alibi_slopes: Tensor | None) -> Tensor:
    """Scaled, biased, masked scores (B, KV, G, nq, nk) for grouped queries; hidden keys are -inf."""
    kv_heads, nq, nk = k.shape[1], q.shape[-2], k.shape[-2]
    q5 = group_queries(q, kv_heads)
    scores = grouped_matmul(q5, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if not causal and alibi_slopes is None:
        return scores
    if alibi_slopes is None:  # the common training case: a cached bias, added in place (the same sums)
        return scores.add_(end_aligned_causal_bias(nq, nk, q.device, scores.dtype))
    offset = offsets(*query_key_positions(nq, nk, q.device))
    slopes = grouped_slopes(alibi_slopes, kv_heads)
    return scores.add_(position_bias(offset, causal=causal, slopes=slopes, dtype=scores.dtype))


@register_attention("dot_product")
class DotProductAttention(AttentionKernel):
    """Materialised softmax attention; no options."""

    display_order = 0  # where it is listed (tables, CLI help)
    is_baseline = True  # the reference every other mechanism is compared with

    def __init__(self) -> None:
        pass

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, alibi_slopes: Tensor | None,
        rope: Rotary | None, need_entropy: bool, **extra: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        q, k = rotate_qk(q, k, rope)
        scores = dense_scores(q, k, causal, alibi_slopes)
        probs = torch.softmax(scores, dim=-1)
        out = ungroup(grouped_matmul(probs, v))
        entropy = ungroup(entropy_from_logits(scores, probs)) if need_entropy else None
        return out, entropy
