"""Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
arXiv:2412.06464): the delta rule with a data-dependent scalar decay per head.

    S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,      o_t = q_t S_t,
    alpha_t = exp(-exp(A_log) softplus(x_t W_alpha + dt_bias)),   beta_t = sigmoid(x_t W_beta)

(rows: q_t, k_t, v_t, o_t are row vectors, S is d_k x d_v; the paper writes the transpose). alpha_t
is Mamba2's gate (a per-head rate A = exp(A_log) times a data-dependent step softplus(.)), beta_t
the delta rule's write strength; both come from `layer_inputs` as {"log_decay": (B, H, n) = log alpha,
"beta": (B, H, n)}. q and k are L2-normalised per head as in the paper's implementation, q then
scaled by 1/sqrt(d) (flash-linear-attention's default); `output_norm` RMS-normalises each head's
output (the paper's per-head RMSNorm before its output gate, gain absorbed by the output projection).

Training: the chunk-wise WY / UT form with decay (`deltanet.chunked_delta_rule`): with b_t the
chunk-local cumulative log alpha, the inverse T of the unit lower triangular I + L per chunk, with
L_tj = beta_t exp(b_t - b_j) k_t . k_j (j < t), gives W = T diag(beta exp(b)) K and U' = T diag(beta) V; a loop
over the n/C chunks carries S (U = U' - W S, S <- exp(b_C) S + (K exp(b_C - b))^T U); outputs
exp(b) Q S + (Q K^T * exp(b_t - b_j)) U. Every factor is exp of a non-positive number: no overflow.
Time O(n C d + n C^2 + n d^2), memory O(n C + (n/C) d^2) per head. Decoding: S (d x d per head), O(d^2)
per token.

Positions: RoPE rotates the normalised q and k at their absolute positions. ALiBi adds -m_h to
log alpha_t (its bias taken out of the exponent). Grouped kv heads: k and v are expanded to the
query heads (gates are per query head). There is no attention distribution, so the entropy is None
(`has_entropy = False`).
"""

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from transformer_comparison.attention.deltanet import WriteStrength, chunked_delta_rule, delta_rule_flops, delta_step
from transformer_comparison.attention.recurrent import (
    RecurrentKernel,
    alibi_log_decay,
    check_common_options,
    check_extras,
    l2_normalize,
)
from transformer_comparison.attention.registry import register_attention

A_RANGE = (0.0, 16.0)  # Mamba2's range for the per-head rate A
DT_RANGE = (1e-3, 1e-1)  # and for the initial step softplus(dt_bias), log-uniform


class GatedDeltaInputs(nn.Module):
    """The decay gate and the write strength: forward(x (B, n, d_model)) -> {"log_decay", "beta"}, each (B, H, n).

    A_log and dt_bias are plain parameters, initialised here as Mamba2 does (A ~ U(0, 16), the initial
    step softplus(dt_bias) log-uniform in [1e-3, 1e-1]); the model's Linear initialisation only touches
    the two projections, whose logits then start about unit normal. `reset_parameters` redraws A_log
    and dt_bias.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.decay_proj = nn.Linear(d_model, num_heads, bias=False)
        self.strength = WriteStrength(d_model, num_heads)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        rate = torch.empty_like(self.A_log).uniform_(*A_RANGE).clamp_min(1e-4)
        self.A_log.copy_(rate.log())
        low, high = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
        step = torch.exp(torch.empty_like(self.dt_bias).uniform_(low, high)).clamp_min(1e-4)
        self.dt_bias.copy_(step + torch.log(-torch.expm1(-step)))  # softplus^-1(step)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        log_decay = -self.A_log.exp() * F.softplus(self.decay_proj(x) + self.dt_bias)
        return {"log_decay": log_decay.transpose(1, 2), **self.strength(x)}


@register_attention("gated_deltanet")
class GatedDeltaNet(RecurrentKernel):
    """The gated delta rule with L2-normalised q and k, a learned decay alpha and write strength beta.

    chunk_size: positions per chunk of the WY form. output_norm: RMS-normalise each head's output.
    """

    display_order = 9  # where it is listed (tables, CLI help)

    def __init__(self, *, chunk_size: Annotated[int, Field(ge=1)] = 64, output_norm: bool = True) -> None:
        self.chunk_size, self.output_norm = check_common_options("gated_deltanet", chunk_size, output_norm)

    def layer_inputs(self, d_model: int, num_heads: int, head_dim: int) -> nn.Module:
        """The gate and write strength projections: x -> {"log_decay": (B, H, n), "beta": (B, H, n)}."""
        return GatedDeltaInputs(d_model, num_heads)

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return l2_normalize(q) * q.shape[-1] ** -0.5, l2_normalize(k)

    def gates(self, extra: dict[str, Tensor], alibi_slopes: Tensor | None, q: Tensor, n: int) -> dict[str, Tensor]:
        batch, heads = q.shape[:2]
        check_extras(self.name, extra, {"log_decay": (batch, heads, n), "beta": (batch, heads, n)})
        alibi = alibi_log_decay(alibi_slopes)
        log_decay = extra["log_decay"] if alibi is None else extra["log_decay"] + alibi
        return {"beta": extra["beta"], "log_decay": log_decay}

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return chunked_delta_rule(q, k, v, gates["beta"], gates["log_decay"], self.chunk_size, state)

    def step(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        return delta_step(q, k, v, gates["beta"], gates["log_decay"], state)

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        return delta_rule_flops(batch, heads, nk, head_dim, self.chunk_size, gated=True)
