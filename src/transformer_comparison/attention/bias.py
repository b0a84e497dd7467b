"""The score rule every softmax kernel shares, written once (in the spirit of attention-gym's
score_mod / mask_mod): the additive bias of query i over key j, from their offset o = p_i - j.

    bias_ij = -m_h |o_ij|   (ALiBi, Press et al. 2022; 0 without slopes)
            = -inf          where the key is hidden: o < 0 when causal, o >= window for a window

dot_product and sparse add it to their (chunk of) dense scores, flash to each tile it computes, local
to each band, and the benchmark hands it to torch's SDPA as `attn_mask`. Adding the bias is exactly
`scores - m |o|` in IEEE arithmetic, so every kernel computes the same biased scores.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def offsets(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """o_ij = p_i - j, (nq, nk), for absolute query and key positions."""
    return q_positions[:, None] - k_positions[None, :]


def position_bias(
    offset: Tensor, *, causal: bool, slopes: Tensor | None = None, window: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The additive bias for offsets o (any shape ending in (nq, nk)); `slopes` broadcast against o
    from the left (e.g. (KV, G, 1, 1) for grouped scores). Hidden keys get -inf."""
    if slopes is None:
        bias = torch.zeros(offset.shape, dtype=dtype, device=offset.device)
    else:
        bias = -(slopes.to(dtype) * offset.abs().to(dtype))
    hidden = hidden_keys(offset, causal=causal, window=window)
    return bias if hidden is None else bias.masked_fill(hidden, float("-inf"))


def hidden_keys(offset: Tensor, *, causal: bool, window: int | None = None) -> Tensor | None:
    """Where a key is invisible to a query: in the future when causal, beyond the window; None: nowhere."""
    hidden = offset < 0 if causal else None
    if window is not None:
        too_far = offset >= window
        hidden = too_far if hidden is None else hidden | too_far
    return hidden


CACHED_BIAS_ELEMENTS = 2**20  # biases up to 1024 x 1024 are kept (4 MiB each in float32); longer ones are not


def end_aligned_causal_bias(nq: int, nk: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The causal bias (nq, nk) of end-aligned queries without slopes (0 visible, -inf hidden). For
    training-sized shapes it is built once and kept (a step would otherwise rebuild the same small
    tensor in every layer); a long evaluation's bias is built afresh so that no cache holds it.
    Shared and read-only: add it, never write into it."""
    if nq * nk <= CACHED_BIAS_ELEMENTS:
        return _cached_causal_bias(nq, nk, device, dtype)
    return _causal_bias(nq, nk, device, dtype)


def _causal_bias(nq: int, nk: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    k_positions = torch.arange(nk, device=device)
    return position_bias(offsets(k_positions[nk - nq :], k_positions), causal=True, dtype=dtype)


_cached_causal_bias = functools.lru_cache(maxsize=8)(_causal_bias)


def clear_bias_cache() -> None:
    """Forget the kept biases (the kernel benchmark measures each case's memory from a cold start)."""
    _cached_causal_bias.cache_clear()
