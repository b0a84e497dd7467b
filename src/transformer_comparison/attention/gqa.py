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
"""

from __future__ import annotations

from transformer_comparison.attention.dot_product import DotProductAttention
from transformer_comparison.attention.registry import register_attention


@register_attention("gqa")
class GroupedQueryAttention(DotProductAttention):
    """Dot-product attention over fewer kv heads than query heads; no options."""
