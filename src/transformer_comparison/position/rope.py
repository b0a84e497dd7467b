"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864).

Dimension pairs (i, i + head_dim/2) of q and k are rotated by the angle pos * base^(-2i/head_dim)
(the "rotate half" pairing of GPT-NeoX and LLaMA; the interleaved pairing of the paper is the same
map up to a fixed permutation of dimensions). A rotation preserves norms, and
<R(m) q, R(n) k> depends on m - n only, so scores see relative positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (n, head_dim/2), computed in float64 then cast."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


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

    def positions(self, nq: int, nk: int, device: torch.device) -> tuple[Tensor, Tensor]:
        k_positions = torch.arange(self.offset, self.offset + nk, device=device)
        return k_positions[nk - nq :], k_positions

    def rotate_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        q_positions, k_positions = self.positions(q.shape[-2], k.shape[-2], q.device)
        cos, sin = rope_cos_sin(k_positions, k.shape[-1], self.base, k.dtype)
        nq = q.shape[-2]
        return rotate(q, cos[-nq:], sin[-nq:]) if nq else q, rotate(k, cos, sin)
