"""NoPE: no positional encoding (Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
Generalization in Transformers"; Haviv et al. 2022, "Transformer Language Models without Positional
Encodings Still Learn Positional Information").

Nothing is added to the embeddings and the kernels receive no position arguments: the causal mask is
the only source of order (a causal model can count how many keys it sees). The baseline every
extrapolation comparison needs. Free in time and memory.
"""

from __future__ import annotations

from transformer_comparison.position.base import PositionEncoding
from transformer_comparison.position.registry import register_position


@register_position("nope")
class NoPositionEncoding(PositionEncoding):
    """No positional information at all; no options."""

    display_order = 3  # where it is listed (tables, CLI help)

    def __init__(self) -> None:
        pass
