"""DeltaNet: linear attention with the delta rule (Schlag et al. 2021, "Linear Transformers Are
Secretly Fast Weight Programmers"; Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", arXiv:2406.06484).

The state is a fast-weight memory that replaces, rather than adds to, what it stored under a key:

    S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t  =  S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}),
    o_t = q_t S_t,     beta_t = sigmoid(x_t W_beta)  (one write strength per head and token)

(rows: q_t, k_t, v_t, o_t are row vectors, S is d_k x d_v; the paper writes the transpose). q and k
are L2-normalised per head, as in the papers' implementations, so I - beta k^T k is a contraction
for beta in (0, 1); q is then scaled by 1/sqrt(d) (flash-linear-attention's default). beta_t comes
from `layer_inputs` ({"beta": (B, H, n)}). `output_norm` RMS-normalises each head's output (the
per-head RMSNorm of the paper's layer, its gain absorbed by the model's output projection).

Training: the chunk-wise WY / UT form of Yang et al. 2024 (`chunked_delta_rule`): per chunk of C
positions, the unit lower triangular system (I + tril(diag(beta) K K^T, -1)) [W U'] = diag(beta) [K V]
gives the WY representation of the chunk's product of Householder-like factors; it is solved for all
chunks at once through the inverse of its matrix (blocked forward substitution over blocks of 16,
`invert_unit_lower`, with its own backward). A loop over the n/C chunks carries the state
(U = U' - W S, S <- S + K^T U) and the outputs Q S + tril(Q K^T) U are batched over all chunks.
Time O(n C d + n C^2 + n d^2) (the inverse is O(C^3) per chunk), memory O(n C + (n/C) d^2) per head. Decoding: S (d x d per head), O(d^2) per token.

Positions: RoPE rotates the normalised q and k at their absolute positions (rotations keep the unit
norm; the output depends only on inner products among the rotated q and k, hence on relative
positions). ALiBi decays the state by exp(-m_h) per step, S_t = exp(-m_h) (I - beta k^T k) S_{t-1} +
beta k^T v (its bias taken out of the exponent): the gated delta rule with a constant gate. Grouped
kv heads: k and v are expanded to the query heads (write strengths are per query head). There is no
attention distribution, so the entropy is None (`has_entropy = False`).
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from transformer_comparison.attention.recurrent import (
    RecurrentKernel,
    alibi_log_decay,
    check_common_options,
    check_extras,
    causal_decay_mask,
    chunk_counts,
    cumulative_log_decay,
    decay_factor,
    from_chunks,
    l2_normalize,
    to_chunks,
)
from transformer_comparison.attention.registry import register_attention

INVERSE_BLOCK = 16  # rows inverted by forward substitution at once in `_UnitLowerInverse`


def invert_unit_lower(lower: Tensor) -> Tensor:
    """(I + L)^-1 for strictly lower triangular L (..., C, C), without autograd: blocked forward substitution.

    The diagonal blocks of 16 are inverted row by row (T_i,<i = -L_i,<i T_<i,<i), batched over every
    block; block row r then follows from the rows above, T_r,<r = -T_rr (L_r,<r T_<r,<r).
    """
    size = lower.shape[-1]
    block = min(INVERSE_BLOCK, size)
    pad = -size % block
    if pad:  # identity rows and columns: the inverse of diag(I + L, I) is diag(T, I)
        lower = F.pad(lower, (0, pad, 0, pad))
    blocks = (size + pad) // block
    diagonal = lower.unflatten(-2, (blocks, block)).unflatten(-1, (blocks, block)).diagonal(dim1=-4, dim2=-2)
    diagonal = diagonal.movedim(-1, -3)  # (..., blocks, block, block)
    inverse = torch.eye(block, dtype=lower.dtype, device=lower.device).expand_as(diagonal).clone()
    for i in range(1, block):
        inverse[..., i, :i] = -(diagonal[..., i, None, :i] @ inverse[..., :i, :i]).squeeze(-2)
    full = torch.zeros_like(lower)
    for r in range(blocks):
        rows = slice(r * block, (r + 1) * block)
        full[..., rows, rows] = inverse[..., r, :, :]
        if r:
            above = slice(0, r * block)
            full[..., rows, above] = -inverse[..., r, :, :] @ (lower[..., rows, above] @ full[..., above, above])
    return full[..., :size, :size] if pad else full


class _UnitLowerInverse(torch.autograd.Function):
    """T = (I + L)^-1 for strictly lower triangular L; backward dL = -tril(T^T dT T^T, -1)."""

    @staticmethod
    def forward(ctx, lower: Tensor) -> Tensor:  # type: ignore[override]
        inverse = invert_unit_lower(lower)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return -(inverse.mT @ grad @ inverse.mT).tril(-1)


def chunked_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None, chunk: int, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """o_t = q_t S_t, S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, chunk-wise (WY / UT form).

    q, k: (B, H, n, d_k); v: (B, H, n, d_v); beta: (B, H, n); log_decay: (B or 1, H, n), (B or 1, H, 1)
    (constant per head) or None (a = 1). Within a chunk (Yang et al. 2024, 2025), with b_t the
    chunk-local cumulative log decay, g_t = exp(b_t) and D_tj = exp(b_t - b_j):

        S_t = g_t S_0 + sum_{j<=t} D_tj k_j^T u_j,
        u_t = beta_t (v_t - g_t k_t S_0 - sum_{j<t} D_tj (k_t . k_j) u_j),

    i.e. (I + L) U = diag(beta) (V - diag(g) K S_0) with L_tj = beta_t D_tj k_t . k_j (j < t): unit lower
    triangular. Its inverse T (one batched blocked forward substitution, `invert_unit_lower`) gives
    W = T diag(beta g) K and U' = T diag(beta) V, so U = U' - W S_0. The loop over chunks carries
    S_0 -> g_C S_0 + (K * exp(b_C - b))^T U; then O = diag(g) Q S_0 + (Q K^T * D) U for all chunks at once.
    """
    n = q.shape[2]
    chunk = min(chunk, n)
    qc, kc, vc = (to_chunks(x, chunk) for x in (q, k, v))
    bc = to_chunks(beta, chunk)[..., None]  # (B, H, N, C, 1)
    b, b_mask = (None, None) if log_decay is None else cumulative_log_decay(log_decay, n, chunk)
    strict = causal_decay_mask(b_mask, chunk, True, q)
    lower = (kc @ kc.mT) * strict * bc  # L, zero on and above the diagonal
    k_written = kc * bc if b is None else kc * (bc * decay_factor(b)[..., None])
    rhs = torch.cat((k_written, vc * bc), -1)
    w, u = (_UnitLowerInverse.apply(lower) @ rhs).split((k.shape[-1], v.shape[-1]), -1)
    k_out = kc if b is None else kc * decay_factor(b[..., -1:] - b)[..., None]
    s = q.new_zeros(q.shape[:2] + (k.shape[-1], v.shape[-1])) if state is None else state
    starts, corrected = [], []
    chunks = qc.shape[2]
    decays = [None] * chunks if b is None else decay_factor(b[..., -1, None, None]).unbind(2)
    for u_c, w_c, k_c, decay in zip(u.unbind(2), w.unbind(2), k_out.mT.unbind(2), decays):
        starts.append(s)
        u_c = u_c - w_c @ s
        corrected.append(u_c)
        s = k_c @ u_c + (s if decay is None else decay * s)
    q_in = qc if b is None else qc * decay_factor(b)[..., None]
    scores = (qc @ kc.mT) * causal_decay_mask(b_mask, chunk, False, q)
    out = q_in @ torch.stack(starts, 2) + scores @ torch.stack(corrected, 2)
    return from_chunks(out, n), s


def delta_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of `chunked_delta_rule`: S <- a S; u = beta (v - k S); S <- S + k^T u; o = q S."""
    if state is None:
        state = q.new_zeros(q.shape[:2] + (k.shape[-1], v.shape[-1]))
    s = state if log_decay is None else decay_factor(log_decay[..., None]) * state
    u = beta[..., None] * (v - k @ s)
    s = s + k.mT @ u
    return q @ s, s


class WriteStrength(nn.Module):
    """beta = sigmoid(x W_beta), one per head: forward(x (B, n, d_model)) -> {"beta": (B, H, n)}.

    With the model's initialisation (std 1/sqrt(fan_in)) the logits are about unit normal: beta near 0.5.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, num_heads, bias=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"beta": torch.sigmoid(self.proj(x)).transpose(1, 2)}


def delta_rule_flops(batch: int, heads: int, nk: int, head_dim: int, chunk_size: int, gated: bool) -> float:
    """Chunk-wise delta rule over nk keys, per position: K K^T, Q K^T and (Q K^T) U (2 C d each), T [K V]
    (4 C d), the inverse (about 2/3 C^2), the loop's W S and K^T U and the read-out Q S (2 d^2 each),
    plus the decay masks and factors (4 C + 4 d) when gated."""
    chunk, chunks, padded = chunk_counts(nk, chunk_size)
    d = head_dim
    per_position = 10 * chunk * d + 2 * chunk * chunk / 3 + 6 * d * d + (4 * chunk + 4 * d if gated else 0)
    return float(batch * heads * (padded * per_position + chunks * d * d))


@register_attention("deltanet")
class DeltaNet(RecurrentKernel):
    """The delta rule with L2-normalised q and k and a learned write strength beta.

    chunk_size: positions per chunk of the WY form. output_norm: RMS-normalise each head's output.
    """

    display_order = 8  # where it is listed (tables, CLI help)

    def __init__(self, *, chunk_size: Annotated[int, Field(ge=1)] = 64, output_norm: bool = True) -> None:
        self.chunk_size, self.output_norm = check_common_options("deltanet", chunk_size, output_norm)

    def layer_inputs(self, d_model: int, num_heads: int, head_dim: int) -> nn.Module:
        """The write strength projection: x -> {"beta": (B, H, n)}."""
        return WriteStrength(d_model, num_heads)

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return l2_normalize(q) * q.shape[-1] ** -0.5, l2_normalize(k)

    def gates(self, extra: dict[str, Tensor], alibi_slopes: Tensor | None, q: Tensor, n: int) -> dict[str, Tensor | None]:
        batch, heads = q.shape[:2]
        check_extras(self.name, extra, {"beta": (batch, heads, n)})
        alibi = alibi_log_decay(alibi_slopes)
        return {"beta": extra["beta"], "log_decay": alibi}  # (1, H, 1) or None

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return chunked_delta_rule(q, k, v, gates["beta"], gates["log_decay"], self.chunk_size, state)

    def step(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return delta_step(q, k, v, gates["beta"], gates["log_decay"], state)

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        return delta_rule_flops(batch, heads, nk, head_dim, self.chunk_size, gated=False)
