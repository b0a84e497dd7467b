"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864).

Dimension pairs (i, i + head_dim/2) of q and k are rotated by the angle pos * base^(-2i/head_dim)
(the "rotate half" pairing of GPT-NeoX and LLaMA; the interleaved pairing of the paper is the same
map up to a fixed permutation of dimensions). A rotation preserves norms, and
<R(m) q, R(n) k> depends on m - n only, so scores see relative positions. Time O(n d), no memory
beyond the rotated q and k.

Scaling, for running a model past the context it was trained at (factor s = new / trained length):
- linear, position interpolation (Chen et al. 2023, "Extending Context Window of Large Language
  Models via Positional Interpolation"): positions divided by s, every frequency theta_i / s;
- ntk, NTK-aware base scaling (bloc97 2023; as in Peng et al. 2023, section 3.1): the base becomes
  base * s^(d / (d - 2)), so the lowest frequency is interpolated by s and the highest left alone;
- yarn (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"):
  "NTK-by-parts" (frequencies whose wavelength is short next to the trained context L are kept,
  r_i = L / lambda_i > beta = 32; long ones, r_i < alpha = 1, are interpolated by s; a linear ramp
  between) and the attention temperature: logits scaled by (0.1 ln s + 1)^2, applied here by
  multiplying cos and sin, so q and k each carry one factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
YARN_ALPHA, YARN_BETA = 1.0, 32.0  # the paper's ramp bounds for LLaMA-family models


def rope_frequencies(head_dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """theta_i = base^(-2i / head_dim), i < head_dim / 2, in float64."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype, inv_freq: Tensor | None = None,
    magnitude: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (n, head_dim/2), computed in float64 then cast;
    `inv_freq` replaces the frequencies of `base` (scaling), `magnitude` multiplies both (YaRN)."""
    if inv_freq is None:
        inv_freq = rope_frequencies(head_dim, base, positions.device)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    if magnitude == 1.0:
        return angle.cos().to(dtype), angle.sin().to(dtype)
    return (magnitude * angle.cos()).to(dtype), (magnitude * angle.sin()).to(dtype)


def scaled_frequencies(head_dim: int, base: float, scaling: str, factor: float, trained_context: int,
                       device: torch.device | None = None) -> tuple[Tensor, float]:
    """The frequencies and the cos/sin magnitude of a RoPE scaling (module docstring)."""
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown rope scaling {scaling!r}; valid: {', '.join(ROPE_SCALINGS)}")
    theta = rope_frequencies(head_dim, base, device)
    if scaling == "none" or factor == 1.0:
        return theta, 1.0
    if scaling == "linear":
        return theta / factor, 1.0
    if scaling == "ntk":
        if head_dim <= 2:
            raise ValueError(f"ntk rope scaling needs a head dimension > 2, got {head_dim}")
        return rope_frequencies(head_dim, base * factor ** (head_dim / (head_dim - 2)), device), 1.0
    ratio = trained_context * theta / (2 * math.pi)  # r_i = L / lambda_i
    keep = ((ratio - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)  # 1: keep, 0: interpolate
    return (1 - keep) * theta / factor + keep * theta, 0.1 * math.log(factor) + 1.0


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last dim of x (..., n, head_dim) with precomputed (n, head_dim/2) cos and sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def apply_rope(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
    """Rotate x of shape (batch, heads, n, head_dim); positions default to 0..n-1."""
    if x.dim() != 4:
        raise ValueError(f"apply_rope expects (batch, heads, n, head_dim), got shape {tuple(x.shape)}")
    if positions is None:
        positions = torch.arange(x.shape[-2], device=x.device)
    cos, sin = rope_cos_sin(positions, x.shape[-1], base, x.dtype)
    return rotate(x, cos, sin)


@dataclass(frozen=True)
class Rotary:
    """RoPE as passed to an attention kernel: `attn(q, k, v, rope=Rotary(base))`.

    Keys sit at absolute positions offset .. offset + nk - 1 and the nq queries at the last nq of
    those positions (the usual end-aligned layout of a KV cache); `offset` is the absolute position
    of the first key, which a decoding cache that drops old keys (local attention) moves forward.
    """

    base: float = 10000.0
    offset: int = 0
    scaling: str = "none"  # none | linear | ntk | yarn (module docstring)
    factor: float = 1.0
    trained_context: int = 0  # yarn's L: the context the model was trained at

    def cos_sin(self, positions: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin (n, head_dim/2) at these absolute positions, with this rotary's scaling."""
        if self.scaling == "none" or self.factor == 1.0:
            return rope_cos_sin(positions, head_dim, self.base, dtype)
        inv_freq, magnitude = scaled_frequencies(head_dim, self.base, self.scaling, self.factor,
                                                 self.trained_context, positions.device)
        return rope_cos_sin(positions, head_dim, self.base, dtype, inv_freq, magnitude)

    def positions(self, nq: int, nk: int, device: torch.device) -> tuple[Tensor, Tensor]:
        k_positions = torch.arange(self.offset, self.offset + nk, device=device)
        return k_positions[nk - nq :], k_positions

    def rotate_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        q_positions, k_positions = self.positions(q.shape[-2], k.shape[-2], q.device)
        cos, sin = self.cos_sin(k_positions, k.shape[-1], k.dtype)
        nq = q.shape[-2]
        return rotate(q, cos[-nq:], sin[-nq:]) if nq else q, rotate(k, cos, sin)


from typing import Annotated, Literal  # noqa: E402

from pydantic import Field  # noqa: E402

from transformer_comparison.position.base import KernelPositions, PositionEncoding  # noqa: E402
from transformer_comparison.position.registry import register_position  # noqa: E402


@register_position("rope")
class RoPE(PositionEncoding):
    """The kernels receive `Rotary(base, scaling...)`; see the module docstring for the scalings.

    `scaling` and `scaling_factor` are evaluation-time options (`tcompare eval --rope_scaling`):
    a model trained with scaling "none" is run at factor s times its training context."""

    display_order = 1  # where it is listed (tables, CLI help)

    needs_even_head_dim = True
    legacy_keys = {"rope_base": "base"}  # position.rope_base in configs before per-encoding sections

    def __init__(
        self, *, base: Annotated[float, Field(gt=0)] = 10000.0,
        scaling: Literal["none", "linear", "ntk", "yarn"] = "none",
        scaling_factor: Annotated[float, Field(ge=1.0)] = 1.0,
    ) -> None:
        if scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope: unknown scaling {scaling!r}; valid: {', '.join(ROPE_SCALINGS)}")
        self.base, self.scaling, self.scaling_factor = float(base), scaling, float(scaling_factor)

    def kernel_positions(self, num_heads: int, context_length: int) -> KernelPositions:
        return KernelPositions(rope=Rotary(self.base, scaling=self.scaling, factor=self.scaling_factor,
                                           trained_context=context_length))
