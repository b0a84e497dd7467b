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

Training: the paper's chunk-wise form with secondary chunking (`recurrent.chunked_linear_channel_decay`),
entirely in log space: b_t = the chunk-local cumulative log alpha; every decay factor formed is
exp(b_t - b_j) with t >= j, hence <= 1, so n = 8192 with strong decay neither overflows nor
underflows into NaN. Inside a chunk of C positions, sub-chunks of 16 read earlier sub-chunks by one
matmul through a reference point between them, and the diagonal 16 x 16 blocks are an elementwise
loop over 16 key positions whose backward recomputes the factors (never a (C, C, d) tensor). Across
chunks the state is decayed by exp(b_C) per channel. Time O(n C d + n d^2), memory
O(n C + (n/C) d^2) per head (plus (C/16) n d for the reference-scaled keys). Decoding: S (d x d per
head), O(d^2) per token.

Positions: RoPE rotates the scaled q and k at their absolute positions before the gated sum (the
per-channel decay does not commute with rotations, so scores are not a function of t - j alone, as
for any gate). ALiBi adds -m_h to every channel's log decay (its bias taken out of the exponent).
Grouped kv heads: k and v are expanded to the query heads (gates are per query head). There is no
attention distribution, so the entropy is None (`has_entropy = False`).
"""

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from transformer_comparison.attention.recurrent import (
    RecurrentKernel,
    alibi_log_decay,
    check_common_options,
    check_extras,
    chunk_counts,
    chunked_linear_channel_decay,
    linear_step,
)
from transformer_comparison.attention.registry import register_attention

SUB_CHUNK = 16  # positions per diagonal block of the intra-chunk scores (the paper's secondary chunk)


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
