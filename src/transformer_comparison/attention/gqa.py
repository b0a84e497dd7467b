"""Grouped-query attention (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer
Models from Multi-Head Checkpoints").

    out_h = softmax(Q_h K_{g(h)}^T / sqrt(d) + B_h) V_{g(h)},   g(h) = h // (heads // kv_heads)

The model projects fewer key/value heads than query heads; each kv head serves a group of
heads // kv_heads query heads (kv_heads == 1 is multi-query attention, kv_heads == heads is
multi-head attention). The maths is dot-product attention, so the kernel is `dot_product`'s: the
queries are grouped to (batch, kv_heads, group, n, d) and the kv head is broadcast over its group,
never repeated in memory.

Time O(n^2 d) per query head; memory O(n^2) per query head for the scores, and the K/V cache and
projections shrink by heads / kv_heads. RoPE rotates q and k before the scores; ALiBi adds
-m_h |i - j| per query head, exactly as in `dot_product`.

Key/value heads: the option `kv_heads` (None: the largest divisor of the query heads that is at
most half of them, 2 of 4, 4 of 8), always fewer than the query heads; the config's
attention.num_kv_heads, which sets the kv heads of every other mechanism, does not apply to gqa.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from transformer_comparison.attention.base import divisors
from transformer_comparison.attention.dot_product import DotProductAttention
from transformer_comparison.attention.registry import register_attention


@register_attention("gqa")
class GroupedQueryAttention(DotProductAttention):
    """Dot-product attention over `kv_heads` key/value heads, fewer than the query heads."""

    legacy_keys = {"gqa_kv_heads": "kv_heads"}  # attention.gqa_kv_heads in configs before per-mechanism sections

    display_order = 4  # where it is listed (tables, CLI help)

    def __init__(self, *, kv_heads: Annotated[int | None, Field(ge=1)] = None) -> None:
        if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1):
            raise ValueError(f"gqa: kv_heads must be None or an integer >= 1, got {kv_heads!r}")
        self.kv_heads_option = kv_heads

    def kv_heads(self, num_heads: int, num_kv_heads: int | None) -> int:
        """`kv_heads` if given (it must divide num_heads and be smaller), else the largest divisor <= num_heads / 2."""
        if num_heads < 2:
            raise ValueError("attention.type=gqa needs model.num_heads >= 2 (fewer kv heads than query heads)")
        allowed = divisors(num_heads)[:-1]
        if self.kv_heads_option is None:
            return max(d for d in allowed if d <= num_heads // 2)
        if self.kv_heads_option not in allowed:
            raise ValueError(f"attention.gqa.kv_heads={self.kv_heads_option} must divide model.num_heads={num_heads} "
                             f"and be smaller; allowed: {allowed}")
        return self.kv_heads_option
