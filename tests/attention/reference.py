"""Dense reference maths for every mechanism, written from the spec with nothing shared with the kernels.

Everything is materialised as (batch, heads, nq, nk) in the input dtype (tests use float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_comparison.position.rope import apply_rope


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def reference_attention(
    mechanism: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    alibi_slopes: Tensor | None = None,
    rope_base: float | None = None,
    window: int | None = None,
    top_k: int | None = None,
    sinks: int = 0,
) -> tuple[Tensor, Tensor]:
    """Return (out, entropy) the way the issue defines each mechanism."""
    heads, nq, nk, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    k_pos = torch.arange(nk)
    q_pos = k_pos[nk - nq :]
    dist = q_pos[:, None] - k_pos[None, :]
    visible = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        visible &= dist >= 0
    if mechanism == "local":
        visible &= (dist < window) | (k_pos[None, :] < sinks)  # attention sinks: the first keys stay visible
    if mechanism == "linear":
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        denom_w = fq @ fk.transpose(-1, -2)
        if rope_base is not None:
            num_w = apply_rope(fq, q_pos, rope_base) @ apply_rope(fk, k_pos, rope_base).transpose(-1, -2)
        else:
            num_w = denom_w
        if alibi_slopes is not None:
            decay = torch.exp(-alibi_slopes[:, None, None] * dist.abs().to(q.dtype))
            denom_w, num_w = denom_w * decay, num_w * decay
        denom_w, num_w = denom_w * visible, num_w * visible
        norm = denom_w.sum(-1, keepdim=True)
        return (num_w @ v) / norm, _entropy(denom_w / norm)
    if rope_base is not None:
        q, k = apply_rope(q, q_pos, rope_base), apply_rope(k, k_pos, rope_base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if alibi_slopes is not None:
        scores = scores - alibi_slopes[:, None, None] * dist.abs().to(q.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    if mechanism == "sparse" and top_k < nk:
        keep_idx = scores.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, keep_idx, True) & visible
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return p @ v, _entropy(p)
