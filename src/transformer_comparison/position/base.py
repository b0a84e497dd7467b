"""What a positional encoding provides to the model, whichever it is (docs/combinations.md).

An encoding enters the model in at most two places:

- `embeddings(start, n, d_model)`: rows added to the token embeddings before the first block
  (sinusoidal), or None;
- `kernel_positions(num_heads, context_length)`: what every attention kernel receives, `rope` (a
  `Rotary`) and/or `alibi_slopes` (heads,), or neither.

Options are the keyword-only parameters of `__init__` with their types, bounds and defaults, as for
attention mechanisms; the config's `position.<name>` subsection holds them.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from transformer_comparison.position.rope import Rotary


@dataclass(frozen=True)
class KernelPositions:
    """The position arguments of an attention kernel call."""

    rope: Rotary | None = None
    alibi_slopes: Tensor | None = None


class PositionEncoding(ABC):
    """Base class: subclasses set `name` (by registering) and override what they provide."""

    name: ClassVar[str]
    needs_even_head_dim: ClassVar[bool] = False

    def embeddings(self, start: int, n: int, d_model: int) -> Tensor | None:
        """Rows start .. start + n - 1 to add to the token embeddings, (n, d_model); None: nothing added."""
        return None

    def kernel_positions(self, num_heads: int, context_length: int) -> KernelPositions:
        """What the attention kernels receive; `context_length` is the training context."""
        return KernelPositions()

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"
