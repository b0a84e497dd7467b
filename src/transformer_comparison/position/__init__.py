"""Positional encodings, a separate axis from the attention mechanism.

Each encoding is a registered class (`base.PositionEncoding`, one file each); how it enters each
mechanism (docs/combinations.md has the table):

- sinusoidal: added to the token embeddings before the first block. No kernel sees it.
- rope: the kernels receive `rope=Rotary(base)`. Every softmax kernel (dot_product, gqa, flash,
  local, sparse) rotates q and k before computing scores, so scores depend on i - j only.
  linear follows RoFormer section 3.4: the feature-mapped phi(q) and phi(k) are rotated in the
  numerator and the denominator keeps the unrotated phi(q).phi(k), which stays positive.
- alibi: the kernels receive `alibi_slopes` (heads,). Softmax kernels add -m_h |i - j| to the scaled
  scores (flash builds it per block, local per band, sparse before its top-k selection).
  linear multiplies its weights by exp(-m_h |i - j|): ALiBi's bias taken out of the exponent,
  a decayed linear attention carried as a decaying state between chunks.
- nope: nothing at all; the causal mask is the only source of order.
"""

from transformer_comparison.position.alibi import alibi_bias, alibi_slopes
from transformer_comparison.position.base import KernelPositions, PositionEncoding
from transformer_comparison.position.registry import (
    build_position,
    options_model,
    position_class,
    register_position,
    registered_names,
)
from transformer_comparison.position.rope import Rotary, apply_rope
from transformer_comparison.position.sinusoidal import sinusoidal_encoding

POSITION_TYPES: tuple[str, ...] = registered_names()  # at import time; position_names() sees later additions

__all__ = [
    "POSITION_TYPES", "KernelPositions", "PositionEncoding", "Rotary", "alibi_bias", "alibi_slopes", "apply_rope",
    "build_position", "kernel_position_args", "options_model", "position_class", "position_names",
    "register_position", "sinusoidal_encoding",
]


def position_names() -> tuple[str, ...]:
    """The registered positional encodings."""
    return registered_names()


def kernel_position_args(position_type: str, num_heads: int, rope_base: float = 10000.0, context_length: int = 0) -> dict:
    """What an attention kernel receives for this encoding: {"rope": Rotary | None, "alibi_slopes": Tensor | None}."""
    options = {"base": rope_base} if "base" in options_model(position_type).model_fields else {}
    args = build_position(position_type, **options).kernel_positions(num_heads, context_length)
    return {"rope": args.rope, "alibi_slopes": args.alibi_slopes}
