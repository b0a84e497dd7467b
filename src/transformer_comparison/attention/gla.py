"""Gated linear attention, GLA (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv:2312.06635).

Linear attention whose state decays by a data-dependent gate per key channel:

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,      o_t = (q_t / sqrt(d)) S_t,
    alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau)    (W_1: d_model x 16, W_2: 16 x H d, tau = 16)

alpha_t is computed from the layer input x_t by `layer_inputs` (the paper's low-rank gate with its
normaliser tau, held in log space: log alpha_t = logsigmoid(x_t W_1 W_2 + b) / tau, shape
(B, H, n, d)). The 1/sqrt(d) scaling is flash-linear-attention's default. `output_norm`
RMS-normalises each head's output (the paper's per-head LayerNorm / RMSNorm before the output
gate, whose gain the model's output projection absorbs; the output gate itself is not part of this
kernel).

Training: the paper's chunk-wise form with secondary chunking (`chunked_linear_channel_decay`),
in log space: b_t is the chunk-local cumulative log alpha, and n = 8192 with strong decay neither
overflows nor underflows into NaN. Inside a chunk of C positions, sub-chunks of 16 read earlier
sub-chunks by one matmul through a reference point between them (factors exp(b_t - r) and
exp(r - b_j), both <= 1). The diagonal 16 x 16 blocks are one matmul through the sub-chunk's midpoint
when no sub-chunk decays by more than 40 nats (factors within e^+-20: exact to rounding), and
otherwise an elementwise loop over the 16 key positions whose backward recomputes the factors
(never a (C, C, d) tensor). Across chunks the state is decayed by exp(b_C) per channel.
Time O(n C d + n d^2), memory O(n C + (n/C) d^2) per head, plus (C/16) n d for the reference-scaled
keys. Decoding: S (d x d per head), O(d^2) per token.

Positions: RoPE rotates the scaled q and k at their absolute positions before the gated sum (the
per-channel decay does not commute with rotations, so scores are not a function of t - j alone, as
for any gate). ALiBi adds -m_h to every channel's log decay (its bias taken out of the exponent).
Grouped kv heads: k and v are expanded to the query heads (gates are per query head). There is no
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
    chunk_counts,
    decay_factor,
    from_chunks,
    linear_step,
    scan_states,
    to_chunks,
)
from transformer_comparison.attention.registry import register_attention

SUB_CHUNK = 16  # positions per diagonal block of the intra-chunk scores (the paper's secondary chunk)
MAX_FACTORED_SPAN = 40.0  # nats of decay within a sub-chunk up to which the diagonal blocks are one matmul


class _DiagonalDecayScores(torch.autograd.Function):
    """A_tj = sum_i q_ti k_ji exp(b_ti - b_ji) for j <= t within sub-chunks, else 0.

    q, k, b: (..., c, d) -> (..., c, c). A loop over the c key positions, each an elementwise op over
    all sub-chunks at once, so the (c, c, d) decay tensor is never materialised: backward keeps only
    q, k and b and recomputes the factors (db = q * dq - k * dk, since A depends on b_t - b_j).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        c = q.shape[-2]
        scores = q.new_zeros(q.shape[:-1] + (c,))
        for j in range(c):
            factor = decay_factor(b[..., j:, :] - b[..., j : j + 1, :])
            scores[..., j:, j] = (q[..., j:, :] * factor * k[..., j : j + 1, :]).sum(-1)
        ctx.save_for_backward(q, k, b)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, k, b = ctx.saved_tensors
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        for j in range(q.shape[-2]):
            weighted = grad[..., j:, j, None] * decay_factor(b[..., j:, :] - b[..., j : j + 1, :])
            dq[..., j:, :] += weighted * k[..., j : j + 1, :]
            dk[..., j, :] = (weighted * q[..., j:, :]).sum(-2)
        return dq, dk, q * dq - k * dk


def diagonal_decay_scores(q: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """A_tj = sum_i q_ti k_ji exp(b_ti - b_ji), j <= t, within sub-chunks: q, k, b (..., c, d) -> (..., c, c).

    When no sub-chunk's decay spans more than MAX_FACTORED_SPAN nats (b_first - b_last, per channel),
    one matmul through the midpoint m = (b_first + b_last) / 2: (q_t exp(b_t - m)) . (k_j exp(m - b_j)),
    each factor within exp(+-span / 2), far inside float range, so the products are exact to rounding.
    Stronger decays take the exact elementwise loop (`_DiagonalDecayScores`).
    """
    span = b[..., 0, :] - b[..., -1, :]
    if span.numel() and float(span.detach().max()) > MAX_FACTORED_SPAN:
        return _DiagonalDecayScores.apply(q, k, b)
    mid = (b[..., :1, :] + b[..., -1:, :]) / 2
    c = q.shape[-2]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    return ((q * torch.exp(b - mid)) @ (k * torch.exp(mid - b)).mT) * causal.to(q.dtype)


def channel_decay_scores(q: Tensor, k: Tensor, b: Tensor, sub: int) -> Tensor:
    """Intra-chunk scores A_tj = sum_i q_ti k_ji exp(b_ti - b_ji), j <= t, for per-channel decays.

    q, k, b: (B, H, N, C, d), b the chunk-local cumulative log decay; C a multiple of `sub`. Blocks of
    `sub` x `sub` on the diagonal come from `diagonal_decay_scores`; a query sub-chunk s reads the keys
    of earlier sub-chunks through the reference point r_s = b at the end of sub-chunk s - 1:
    (q_t exp(b_t - r_s)) . (k_j exp(r_s - b_j)), both factors <= 1 for j < s sub <= t, one matmul.
    """
    batch, heads, chunks, chunk, dim = q.shape
    ns = chunk // sub
    qs, ks, bs = (x.view(batch, heads, chunks, ns, sub, dim) for x in (q, k, b))
    diagonal = diagonal_decay_scores(qs, ks, bs)  # (B, H, N, ns, sub, sub)
    eye = torch.eye(ns, dtype=q.dtype, device=q.device)
    scores = (diagonal[..., :, :, None, :] * eye[:, None, :, None]).reshape(batch, heads, chunks, chunk, chunk)
    if ns > 1:
        ref = bs[..., :-1, -1:, :]  # (B, H, N, ns-1, 1, d)
        q_off = qs[..., 1:, :, :] * decay_factor(bs[..., 1:, :, :] - ref)
        k_off = k.unsqueeze(3) * decay_factor((ref - b.unsqueeze(3)).clamp(max=0.0))  # (B, H, N, ns-1, C, d)
        keys_before = torch.arange(chunk, device=q.device) < (torch.arange(1, ns, device=q.device) * sub)[:, None]
        off = (q_off @ k_off.mT) * keys_before[:, None, :].to(q.dtype)  # (B, H, N, ns-1, sub, C)
        scores = scores + F.pad(off, (0, 0, 0, 0, 1, 0)).reshape(batch, heads, chunks, chunk, chunk)
    return scores


def chunked_linear_channel_decay(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk: int, sub: int, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """o_t = q_t S_t, S_t = diag(a_t) S_{t-1} + k_t^T v_t with a_t a vector over the d_k channels.

    As `chunked_linear_scalar_decay` with log_decay (B, H, n, d_k); the intra-chunk scores need
    per-channel factors (`channel_decay_scores`). `chunk` must be a multiple of `sub` or <= it.
    """
    n = q.shape[2]
    if chunk > n:  # one chunk, padded to a whole number of sub-chunks
        chunk = min(chunk, -(-n // sub) * sub)
    sub = min(sub, chunk)
    qc, kc, vc = (to_chunks(x, chunk) for x in (q, k, v))
    b = to_chunks(log_decay, chunk).cumsum(-2)  # (B, H, N, C, d_k)
    out = channel_decay_scores(qc, kc, b, sub) @ vc
    updates = (kc * decay_factor(b[..., -1:, :] - b)).mT @ vc
    starts, final = scan_states(updates, decay_factor(b[..., -1, :, None]), state)
    out = out + (qc * decay_factor(b)) @ starts
    return from_chunks(out, n), final


class GLAGate(nn.Module):
    """log alpha = logsigmoid(x W_1 W_2 + b) / normalizer for every head and key channel.

    forward(x (B, n, d_model)) -> {"log_decay": (B, H, n, head_dim)}. With the model's initialisation
    (Linear std 1/sqrt(fan_in), biases zero) the logits are about unit normal, so alpha starts
    near 0.5^(1/16) = 0.96: memories of a few dozen tokens, as in the paper.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, rank: int, normalizer: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.normalizer = num_heads, head_dim, normalizer
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, num_heads * head_dim, bias=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        batch, n, _ = x.shape
        log_decay = F.logsigmoid(self.up(self.down(x))) / self.normalizer
        return {"log_decay": log_decay.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)}


@register_attention("gla")
class GatedLinearAttention(RecurrentKernel):
    """GLA with a per-channel data-dependent decay, chunk-wise in training and recurrent when decoding.

    chunk_size: positions per chunk (at most 16, or a multiple of 16: the sub-chunk length).
    gate_rank: the low-rank width of the gate projection. gate_normalizer: tau in alpha = sigmoid(.)^(1/tau).
    output_norm: RMS-normalise each head's output.
    """

    display_order = 7  # where it is listed (tables, CLI help)

    def __init__(
        self,
        *,
        chunk_size: Annotated[int, Field(ge=1)] = 64,
        gate_rank: Annotated[int, Field(ge=1)] = 16,
        gate_normalizer: Annotated[float, Field(gt=0.0)] = 16.0,
        output_norm: bool = True,
    ) -> None:
        self.chunk_size, self.output_norm = check_common_options("gla", chunk_size, output_norm)
        if chunk_size > SUB_CHUNK and chunk_size % SUB_CHUNK:
            raise ValueError(f"gla: chunk_size must be at most {SUB_CHUNK} or a multiple of {SUB_CHUNK}, got {chunk_size}")
        if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank < 1:
            raise ValueError(f"gla: gate_rank must be an integer >= 1, got {gate_rank!r}")
        self.gate_rank = gate_rank
        valid = isinstance(gate_normalizer, (int, float)) and not isinstance(gate_normalizer, bool)
        if not valid or not 0.0 < gate_normalizer < float("inf"):
            raise ValueError(f"gla: gate_normalizer must be a positive finite number, got {gate_normalizer!r}")
        self.gate_normalizer = float(gate_normalizer)

    def layer_inputs(self, d_model: int, num_heads: int, head_dim: int) -> nn.Module:
        """The gate projection: x -> {"log_decay": (B, H, n, head_dim)}."""
        return GLAGate(d_model, num_heads, head_dim, self.gate_rank, self.gate_normalizer)

    def gates(self, extra: dict[str, Tensor], alibi_slopes: Tensor | None, q: Tensor, n: int) -> dict[str, Tensor]:
        batch, heads, _, head_dim = q.shape
        check_extras(self.name, extra, {"log_decay": (batch, heads, n, head_dim)})
        log_decay = extra["log_decay"]
        alibi = alibi_log_decay(alibi_slopes)
        return {"log_decay": log_decay if alibi is None else log_decay + alibi[..., None]}

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return chunked_linear_channel_decay(q, k, v, gates["log_decay"], self.chunk_size, SUB_CHUNK, state)

    def step(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return linear_step(q, k, v, gates["log_decay"], state)

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        """Chunk-wise form over the nk keys: diagonal sub-chunk scores (3 FLOPs per (t, j <= t, channel)),
        the scores against earlier sub-chunks (2 (C - c) d per position), their product with V (2 C d),
        the chunk states and their read-out (4 d^2) and the decay factors (about 8 d) per position."""
        chunk, chunks, padded = chunk_counts(nk, self.chunk_size)
        sub, d = min(SUB_CHUNK, chunk), head_dim
        per_position = 1.5 * (sub + 1) * d + 2 * (chunk - sub) * d + 2 * chunk * d + 4 * d * d + 8 * d
        return float(batch * heads * (padded * per_position + 2 * chunks * d * d))
