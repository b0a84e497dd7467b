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

Training: the chunk-wise WY / UT form of Yang et al. 2024 (`recurrent.chunked_delta_rule`): per chunk
of C positions, one batched unit-lower-triangular solve (I + tril(diag(beta) K K^T, -1)) [W U'] =
diag(beta) [K V] gives the WY representation of the chunk's product of Householder-like factors;
a loop over the n/C chunks carries the state (U = U' - W S, S <- S + K^T U) and the outputs are
Q S + tril(Q K^T) U, batched. Time O(n C d + n d^2) (the solve is O(C^2 d) per chunk), memory
O(n C + (n/C) d^2) per head. Decoding: S (d x d per head), O(d^2) per token.

Positions: RoPE rotates the normalised q and k at their absolute positions (rotations keep the unit
norm; the output depends only on inner products among the rotated q and k, hence on relative
positions). ALiBi decays the state by exp(-m_h) per step, S_t = exp(-m_h) (I - beta k^T k) S_{t-1} +
beta k^T v (its bias taken out of the exponent): the gated delta rule with a constant gate. Grouped
kv heads: k and v are expanded to the query heads (write strengths are per query head). There is no
attention distribution, so the entropy is None (`has_entropy = False`).
"""

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from transformer_comparison.attention.recurrent import (
    RecurrentKernel,
    alibi_log_decay,
    check_common_options,
    check_extras,
    chunk_counts,
    chunked_delta_rule,
    delta_step,
    l2_normalize,
)
from transformer_comparison.attention.registry import register_attention


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
    """Chunk-wise delta rule over nk keys: K K^T and Q K^T (4 C d per position), the triangular solve
    for W and U' (2 C d), the loop's W S and K^T U (4 d^2), the outputs Q S and (Q K^T) U (2 d^2 + 2 C d),
    plus the decay masks (4 C) when gated."""
    chunk, chunks, padded = chunk_counts(nk, chunk_size)
    d = head_dim
    per_position = 8 * chunk * d + 6 * d * d + (4 * chunk if gated else 0)
    return float(batch * heads * (padded * per_position + chunks * d * d))


@register_attention("deltanet")
class DeltaNet(RecurrentKernel):
    """The delta rule with L2-normalised q and k and a learned write strength beta.

    chunk_size: positions per chunk of the WY form. output_norm: RMS-normalise each head's output.
    """

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
        return {"beta": extra["beta"], "log_decay": None if alibi is None else alibi.expand(1, heads, n)}

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return chunked_delta_rule(q, k, v, gates["beta"], gates["log_decay"], self.chunk_size, state)

    def step(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return delta_step(q, k, v, gates["beta"], gates["log_decay"], state)

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        return delta_rule_flops(batch, heads, nk, head_dim, self.chunk_size, gated=False)
