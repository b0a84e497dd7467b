"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention").

    out_i = sum_j w_ij v_j / sum_j w_ij,   w_ij = phi(q_i) . phi(k_j),   phi(x) = elu(x) + 1,

over the keys query i sees (causal: j <= i; otherwise all), with no 1/sqrt(d) scaling. Because
w_ij factorises, sum_j w_ij v_j = phi(q_i) S_i with the state S_i = sum_j phi(k_j) v_j^T (d x d)
and the normaliser phi(q_i) . z_i with z_i = sum_j phi(k_j).

Causal sums are computed chunk-wise (chunk_size C): inside a chunk the weights are a masked C x C
matrix; across chunks each chunk contributes its state sum_j phi(k_j) v_j^T, and the states at the
starts of all chunks are one exclusive prefix sum over chunks, computed as lower-triangular matmuls
over blocks of up to 64 chunks (faster than cumsum) with the block totals carried one level up.
Time O(n C d + (n/C) d^2) (the prefix costs (n/C) * min(n/C, 64) * d^2 multiply-adds), memory
O(n C + (n/C) d^2) per head, never n x n; everything is batched over chunks and heads. The
normaliser rides along as an extra column of ones in v (with RoPE, a second pass over the unrotated
features). Grouped K/V heads: a kv head's query heads are folded into the rows of each chunk's
matmuls, so K and V are never repeated.

Positions (RoFormer, Su et al. 2021, section 3.4, and `position/__init__.py`):
- RoPE: the numerator uses rotated features, w_ij = R_i phi(q_i) . R_j phi(k_j), which depends on
  i - j; the denominator keeps the unrotated phi(q_i) . phi(k_j), which stays positive.
- ALiBi: every weight is multiplied by exp(-m_h |i - j|) (ALiBi's bias taken out of the exponent):
  a decayed linear attention whose state decays by exp(-m_h) per position, exp(-m_h C) per chunk.
  Non-causal attention sums a forward (j <= i) and a backward (j > i) decayed pass.

Entropy: of the normalised denominator weights p_ij = w_ij / sum_j w_ij (unrotated when RoPE is on,
since rotated numerator weights can be negative and are no distribution). It cannot be linearised,
so it is computed for `chunk_size` queries at a time, without gradient, in O(n C) memory per head.

The denominator is floored at `eps`: exact whenever it is larger (phi > 0 keeps it positive unless
all features underflow), and never a division by zero in low precision. Queries shorter than the
keys (decoding from a cache) are padded at the front to the keys' length, so a call costs O(nk).

Decoding (`decode`) needs no keys at all: a `LinearState` holds, per kv head (per query head with
ALiBi, whose decay differs by head), S = sum_j g^(p-j) R_j phi(k_j) v_j^T (d x d; R_j = 1 without
RoPE) and z = sum_j g^(p-j) phi(k_j) (d), g = exp(-m_h) (1 without ALiBi). A new token updates
S <- g S + R_p phi(k_p) v_p^T, z <- g z + phi(k_p) and reads out (R_p phi(q_p) S) / (phi(q_p) . z),
floored like the kernel: O(d^2) per token and head, whatever the position. Several new tokens (a
prompt) are one chunked call over themselves plus the decayed old state's contribution, and a
closed-form state update: O(n C d + n d^2).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from transformer_comparison.attention.base import (
    LOW_PRECISION,
    AttentionKernel,
    check_new_tokens,
    check_positive_int,
    group_queries,
    query_key_positions,
    ungroup,
)
from transformer_comparison.attention.cache import DecodeCache
from transformer_comparison.attention.registry import register_attention
from transformer_comparison.position.rope import Rotary, rotate


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1, positive everywhere."""
    return F.elu(x).add_(1.0)


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {"elu": elu_feature_map}
PREFIX_BLOCK = 64  # chunks per lower-triangular prefix matmul


def _decay(exponent: Tensor) -> Tensor:
    """exp(exponent) for exponents <= 0, with results below 4x the smallest normal number set to 0.

    Subnormal decay factors would slow every multiply that reads them ~30x on x86 (and push torch's
    vectorised exp off its fast path); flushing them changes nothing above 1e-37 (float32).
    """
    tiny = torch.finfo(exponent.dtype).tiny
    return F.threshold(exponent.clamp(min=math.log(tiny) + 1.0).exp(), 4 * tiny, 0.0)


def _exclusive_prefix(states: Tensor, log_decay: Tensor | None) -> Tensor:
    """P_c = sum_{c' < c} a^(c - 1 - c') U_c' along dim -2 of states (..., chunks, s), a = exp(log_decay).

    log_decay broadcasts against states as (..., 1, 1); None means a = 1 (a plain exclusive sum).
    Within blocks of up to PREFIX_BLOCK chunks this is one strictly lower-triangular matmul (faster
    than cumsum here); the blocks' totals carry across blocks by the same rule one level up, so the
    cost stays linear in the number of chunks. Every factor is a power of a <= 1: no overflow.
    """
    chunks = states.shape[-2]
    block = min(chunks, PREFIX_BLOCK)
    pad = -chunks % block
    blocks = (F.pad(states, (0, 0, 0, pad)) if pad else states).unflatten(-2, (-1, block))  # (..., nb, S, s)
    steps = torch.arange(block, device=states.device)
    lags = steps[:, None] - 1 - steps[None, :]  # c - 1 - c' within a block
    tri = (lags >= 0).to(states.dtype)
    if log_decay is not None:
        tri = _decay(log_decay * lags.clamp_min(0)) * tri
    prefix = tri.unsqueeze(-3) @ blocks  # exclusive within each block
    if blocks.shape[-3] > 1:
        step = 1.0 if log_decay is None else _decay(log_decay)
        totals = blocks[..., -1, :] + step * prefix[..., -1, :]  # each block's sum, decayed to its end
        carry = _exclusive_prefix(totals, None if log_decay is None else log_decay * block)  # at block starts
        from_block_start = 1.0 if log_decay is None else _decay(log_decay * steps[:, None]).unsqueeze(-3)
        prefix = prefix + from_block_start * carry.unsqueeze(-2)
    prefix = prefix.flatten(-3, -2)
    return prefix[..., :chunks, :] if pad else prefix


def _causal_sum(fq: Tensor, fk: Tensor, v: Tensor, slopes: Tensor | None, chunk: int, include_diagonal: bool) -> Tensor:
    """sum_{j <= i} (fq_i . fk_j) exp(-m |i - j|) v_j (j < i without the diagonal), chunk-wise.

    fq: (B, KV, G, n, d) queries grouped by kv head; fk: (B, KV, n, d); v: (B, KV, n, e);
    slopes: (KV, G) or None. Returns (B, KV, G, n, e).
    """
    batch, kv_heads, groups, n, dim = fq.shape
    pad = -n % chunk
    if pad:  # zero features contribute nothing
        fq, fk, v = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v))
    chunks, width = (n + pad) // chunk, v.shape[-1]
    q = fq.view(batch, kv_heads, groups, chunks, chunk, dim)
    # Rows layout (B, KV, chunks, G*C, d): a kv head's G query heads are the rows of one matmul.
    q_rows = q.transpose(2, 3).reshape(batch, kv_heads, chunks, groups * chunk, dim)
    k = fk.view(batch, kv_heads, chunks, chunk, dim)
    vc = v.view(batch, kv_heads, chunks, chunk, width)

    local = torch.arange(chunk, device=fq.device)
    offset = local[:, None] - local[None, :]
    visible = offset >= (0 if include_diagonal else 1)
    if slopes is None:
        intra = ((q_rows @ k.mT) * visible.repeat(groups, 1)) @ vc  # row g*C + i
        states = (k.mT @ vc).flatten(-2)  # (B, KV, chunks, d*e)
        out = intra + q_rows @ _exclusive_prefix(states, None).view(batch, kv_heads, chunks, dim, width)
        out = out.view(batch, kv_heads, chunks, groups, chunk, width).transpose(2, 3)
    else:
        m = slopes[:, :, None, None]  # (KV, G, 1, 1)
        decay = _decay(-m[..., None] * offset.clamp_min(0)) * visible  # (KV, G, 1, C, C)
        intra = ((q_rows @ k.mT) * decay.transpose(1, 2).flatten(2, 3)) @ vc
        intra = intra.view(batch, kv_heads, chunks, groups, chunk, width).transpose(2, 3)
        to_chunk_end = _decay(-m[..., None] * (chunk - local)[:, None])  # (KV, G, 1, C, 1)
        from_chunk_start = _decay(-m[..., None] * local[:, None])
        states = ((k.unsqueeze(2) * to_chunk_end).mT @ vc.unsqueeze(2)).flatten(-2)  # (B, KV, G, chunks, d*e)
        prefix = _exclusive_prefix(states, -m * chunk).view(batch, kv_heads, groups, chunks, dim, width)
        out = intra + (q * from_chunk_start) @ prefix
    out = out.reshape(batch, kv_heads, groups, chunks * chunk, width)
    return out[:, :, :, :n] if pad else out


def _weighted_sum(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, slopes: Tensor | None, chunk: int) -> Tensor:
    """sum_j w_ij v_j over the visible keys, w_ij = (fq_i . fk_j) exp(-m |i - j|); shapes as `_causal_sum`."""
    if causal:
        return _causal_sum(fq, fk, v, slopes, chunk, include_diagonal=True)
    if slopes is None:
        return fq @ (fk.mT @ v).unsqueeze(2)
    backward = _causal_sum(fq.flip(3), fk.flip(2), v.flip(2), slopes, chunk, include_diagonal=False).flip(3)
    return _causal_sum(fq, fk, v, slopes, chunk, include_diagonal=True) + backward


@torch.no_grad()
def _denominator_entropy(fq: Tensor, fk: Tensor, causal: bool, slopes: Tensor | None, eps: float, block: int) -> Tensor:
    """Entropy of p_ij = w_ij / sum_j w_ij, `block` queries at a time. fq: (B, KV, G, nq, d) -> (B, KV, G, nq)."""
    batch, kv_heads, groups, nq, dim = fq.shape
    q_pos, k_pos = query_key_positions(nq, fk.shape[2], fq.device)
    entropies = []
    for start in range(0, nq, block):
        q_block = fq[:, :, :, start : start + block]
        rows = q_block.shape[3]
        weights = (q_block.reshape(batch, kv_heads, groups * rows, dim) @ fk.mT).view(batch, kv_heads, groups, rows, -1)
        offset = q_pos[start : start + rows, None] - k_pos[None, :]
        if slopes is not None:
            weights = weights * _decay(-slopes[:, :, None, None] * offset.abs())
        if causal:
            weights = weights.masked_fill(offset < 0, 0.0)
        total = weights.sum(-1).clamp_min(eps)
        entropies.append(total.log() - torch.xlogy(weights, weights).sum(-1) / total)
    return torch.cat(entropies, dim=-1)


def _rotate_features(fq: Tensor, fk: Tensor, rope: Rotary) -> tuple[Tensor, Tensor]:
    """RoPE on the feature-mapped queries and keys, both at the key positions (queries are aligned)."""
    _, positions = rope.positions(fk.shape[-2], fk.shape[-2], fk.device)
    cos, sin = rope.cos_sin(positions, fk.shape[-1], fk.dtype)
    return rotate(fq, cos, sin), rotate(fk, cos, sin)


@register_attention("linear")
class LinearAttention(AttentionKernel):
    """Linear attention with phi = elu + 1, computed in chunks of `chunk_size` positions.

    feature_map: the name of phi; only "elu" exists. eps: floor of the normaliser sum_j w_ij.
    """

    display_order = 1  # where it is listed (tables, CLI help)

    def __init__(
        self, *, chunk_size: Annotated[int, Field(ge=1)] = 64, feature_map: Literal["elu"] = "elu",
        eps: Annotated[float, Field(gt=0)] = 1e-6,
    ) -> None:
        self.chunk_size = check_positive_int("chunk_size", chunk_size, "linear")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear: unknown feature_map {feature_map!r}; valid: {', '.join(FEATURE_MAPS)}")
        self.feature_map = feature_map
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
            raise ValueError(f"linear: eps must be a positive finite number, got {eps!r}")
        self.eps = float(eps)

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        """phi(k)^T v into the d x d state and phi(q) times the state: 2 x 2 d^2 FLOPs per token."""
        return 4.0 * batch * heads * nq * head_dim * head_dim

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, alibi_slopes: Tensor | None,
        rope: Rotary | None, need_entropy: bool, **extra: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        heads, nq = q.shape[1], q.shape[2]
        kv_heads, nk = k.shape[1], k.shape[2]
        phi = FEATURE_MAPS[self.feature_map]
        fq, fk = phi(q), phi(k)
        # Queries padded at the front to the key positions and grouped by kv head: (B, KV, G, nk, d).
        aligned = group_queries(F.pad(fq, (0, 0, nk - nq, 0), value=1.0) if nk > nq else fq, kv_heads)
        slopes = None if alibi_slopes is None else alibi_slopes.view(kv_heads, heads // kv_heads)
        ones = v.new_ones(*v.shape[:-1], 1)
        chunk = self.chunk_size
        if rope is None:
            summed = _weighted_sum(aligned, fk, torch.cat((v, ones), -1), causal, slopes, chunk)
            numerator, denominator = summed.split((v.shape[-1], 1), -1)
        else:
            rq, rk = _rotate_features(aligned, fk, rope)
            numerator = _weighted_sum(rq, rk, v, causal, slopes, chunk)
            denominator = _weighted_sum(aligned, fk, ones, causal, slopes, chunk)
        if nk > nq:
            numerator, denominator = numerator[..., nk - nq :, :], denominator[..., nk - nq :, :]
        out = numerator * denominator.clamp_min(self.eps).reciprocal()
        entropy = None
        if need_entropy:
            entropy = ungroup(_denominator_entropy(group_queries(fq, kv_heads), fk, causal, slopes, self.eps, chunk))
        return ungroup(out), entropy

    def new_cache(self) -> LinearState:
        """An empty recurrent state (see `decode`): its size never grows with the tokens seen."""
        return LinearState()

    def decode(
        self, q: Tensor, k: Tensor, v: Tensor, cache: DecodeCache, *,
        alibi_slopes: Tensor | None = None, rope: Rotary | None = None, **extra: Tensor,
    ) -> Tensor:
        """Causal linear attention of n new tokens given the state of all earlier ones, then fold them in.

        Equal to the last n rows of `self(q_all, k_all, v_all, causal=True)` (up to rounding). RoPE
        rotates at the absolute positions cache.position .. cache.position + n - 1.
        """
        if not isinstance(cache, LinearState):
            raise ValueError(f"linear attention decodes with a LinearState (from new_cache()), got {type(cache).__name__}")
        check_new_tokens(q, k, v, alibi_slopes)
        input_dtype = q.dtype
        if input_dtype in LOW_PRECISION:
            q, k, v = q.float(), k.float(), v.float()
        heads, n = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=q.dtype).view(kv_heads, -1)
        phi = FEATURE_MAPS[self.feature_map]
        fq, fk = group_queries(phi(q), kv_heads), phi(k)  # (B, KV, G, n, d), (B, KV, n, d)
        rq, rk = fq, fk
        if rope is not None:
            _, positions = replace(rope, offset=cache.position).positions(n, n, q.device)
            cos, sin = rope.cos_sin(positions, q.shape[-1], q.dtype)
            rq, rk = rotate(fq, cos, sin), rotate(fk, cos, sin)
        state = cache.initial(fk, v, heads // kv_heads if slopes is not None else 1)
        if n == 1:  # update, then read out: the whole step is O(d^2) per head
            cache.fold(rk, fk, v, slopes)
            numerator, denominator = rq @ cache.s, fq @ cache.z.unsqueeze(-1)
        else:
            numerator, denominator = self._prefill(fq, rq, fk, rk, v, slopes, state)
            cache.fold(rk, fk, v, slopes)
        out = ungroup(numerator * denominator.clamp_min(self.eps).reciprocal())
        return out.to(input_dtype)

    def _prefill(
        self, fq: Tensor, rq: Tensor, fk: Tensor, rk: Tensor, v: Tensor, slopes: Tensor | None,
        state: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Numerator (B, KV, G, n, e) and denominator (B, KV, G, n, 1) of n > 1 new queries: the chunked
        causal sums over the new tokens plus the old state's contribution, decayed by g^(t+1) at offset t."""
        s_old, z_old = state
        n = fq.shape[3]
        chunk = min(self.chunk_size, n)
        ones = v.new_ones(*v.shape[:-1], 1)
        if rq is fq:
            summed = _weighted_sum(fq, fk, torch.cat((v, ones), -1), True, slopes, chunk)
            numerator, denominator = summed.split((v.shape[-1], 1), -1)
        else:
            numerator = _weighted_sum(rq, rk, v, True, slopes, chunk)
            denominator = _weighted_sum(fq, fk, ones, True, slopes, chunk)
        from_state_num, from_state_den = rq @ s_old, fq @ z_old.unsqueeze(-1)
        if slopes is not None:
            steps = torch.arange(1, n + 1, device=fq.device, dtype=fq.dtype)
            decay = _decay(-slopes[:, :, None, None] * steps[:, None])  # (KV, G, n, 1)
            from_state_num, from_state_den = from_state_num * decay, from_state_den * decay
        return numerator + from_state_num, denominator + from_state_den


class LinearState(DecodeCache):
    """Linear attention's decoding memory: S (B, KV, Gs, d, e) and z (B, KV, Gs, d), Gs = heads // kv_heads
    with ALiBi (each query head decays at its own rate) and 1 without; plus the tokens seen."""

    def __init__(self) -> None:
        self.s: Tensor | None = None
        self.z: Tensor | None = None
        self.seen = 0

    @property
    def position(self) -> int:
        return self.seen

    def tensors(self) -> list[Tensor]:
        return [] if self.s is None or self.z is None else [self.s, self.z]

    def initial(self, fk: Tensor, v: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """The state before this call (zeros on the first call), checked against the new tokens."""
        batch, kv_heads, _, dim = fk.shape
        if self.s is None or self.z is None:
            self.s = fk.new_zeros(batch, kv_heads, groups, dim, v.shape[-1])
            self.z = fk.new_zeros(batch, kv_heads, groups, dim)
        elif self.s.shape != (batch, kv_heads, groups, dim, v.shape[-1]) or self.s.dtype != fk.dtype:
            raise ValueError(f"LinearState: the new tokens (batch {batch}, kv_heads {kv_heads}, head_dim {dim}, "
                             f"{fk.dtype}) do not match the state {tuple(self.s.shape)} {self.s.dtype}")
        return self.s, self.z

    def fold(self, rk: Tensor, fk: Tensor, v: Tensor, slopes: Tensor | None) -> None:
        """Add n new tokens: S <- g^n S + sum_t g^(n-1-t) rk_t v_t^T, z likewise with the unrotated fk."""
        assert self.s is not None and self.z is not None
        n = fk.shape[2]
        if slopes is None:
            self.s = self.s + (rk.mT @ v).unsqueeze(2)
            self.z = self.z + fk.sum(2).unsqueeze(2)
        else:
            m = slopes[:, :, None]  # (KV, G, 1)
            to_end = _decay(-m * torch.arange(n - 1, -1, -1, device=fk.device, dtype=fk.dtype))[..., None]  # (KV, G, n, 1)
            whole = _decay(-m * n)  # (KV, G, 1)
            self.s = whole[..., None] * self.s + (rk.unsqueeze(2) * to_end).mT @ v.unsqueeze(2)
            self.z = whole * self.z + (fk.unsqueeze(2) * to_end).sum(3)
        self.seen += n

    def __repr__(self) -> str:
        shape = None if self.s is None else tuple(self.s.shape)
        return f"LinearState(s={shape}, seen={self.seen})"
