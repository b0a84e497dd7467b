"""Positional encodings, a separate axis from the attention mechanism.

How each encoding enters each mechanism (the one place this is decided; docs/combinations.md has
the 18-cell table):

- sinusoidal: added to the token embeddings before the first block. No kernel sees it.
- rope: the kernels receive `rope=Rotary(base)`. Every softmax kernel (dot_product, gqa, flash,
  local, sparse) rotates q and k before computing scores, so scores depend on i - j only.
  linear follows RoFormer section 3.4: the feature-mapped phi(q) and phi(k) are rotated in the
  numerator and the denominator keeps the unrotated phi(q).phi(k), which stays positive.
- alibi: the kernels receive `alibi_slopes` (heads,). Softmax kernels add -m_h |i - j| to the scaled
  scores (flash builds it per block, local per band, sparse before its top-k selection).
  linear multiplies its weights by exp(-m_h |i - j|): ALiBi's bias taken out of the exponent,
  a decayed linear attention carried as a decaying state between chunks.
"""

from transformer_comparison.position.alibi import alibi_bias, alibi_slopes
from transformer_comparison.position.rope import Rotary, apply_rope
from transformer_comparison.position.sinusoidal import sinusoidal_encoding

POSITION_TYPES: tuple[str, ...] = ("sinusoidal", "rope", "alibi")

__all__ = ["POSITION_TYPES", "kernel_position_args", "Rotary", "alibi_bias", "alibi_slopes", "apply_rope", "sinusoidal_encoding"]


def kernel_position_args(position_type: str, num_heads: int, rope_base: float = 10000.0) -> dict:
    """What an attention kernel receives for this encoding: {"rope": Rotary | None, "alibi_slopes": Tensor | None}."""
    if position_type not in POSITION_TYPES:
        raise ValueError(f"unknown position embedding {position_type!r}; valid: {', '.join(POSITION_TYPES)}")
    return {
        "rope": Rotary(rope_base) if position_type == "rope" else None,
        "alibi_slopes": alibi_slopes(num_heads) if position_type == "alibi" else None,
    }
