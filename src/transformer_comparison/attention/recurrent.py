"""Shared machinery of the recurrent mechanisms (retention, gla, deltanet, gated_deltanet).

Each keeps a state S (d_k x d_v) per query head, reads o_t = q_t S_t (q_t, o_t rows) and updates
it once per token:

    linear with decay:  S_t = diag(a_t) S_{t-1} + k_t^T v_t                  (retention, gla)
    delta rule:         S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t   (deltanet, gated_deltanet)

with a_t = exp(log_decay_t) <= 1, a scalar per head (retention, gated_deltanet, ALiBi) or a vector
over the d_k channels (gla). Training uses the chunk-wise forms below, batched over all chunks of
C positions at once, with one Python loop over the n/C chunks for the state that crosses chunk
boundaries: time O(n C d + n d^2), memory O(n C + (n/C) d^2) per head (the state at every chunk
start is kept for backward). Decoding uses the one-token recurrence. Here: the scalar-decay form
(`chunked_linear_scalar_decay`, retention) and the linear step (`linear_step`, retention and gla);
gla.py has the per-channel form, deltanet.py the delta rule's (used by gated_deltanet too).

Decays are handled in log space: b_t is the chunk-local cumulative log decay, and every factor
exp(b_t - b_j) that is formed has t >= j, so it is <= 1 (it may underflow to 0, which is its value
to float precision; it never overflows).

`RecurrentKernel` is the shared kernel: causal only, no attention distribution (entropy None),
grouped kv heads expanded to the query heads (the state is per query head anyway, since decays and
write strengths are per query head), RoPE applied to the normalised q and k at their absolute
positions, ALiBi folded into the decay as an extra -m_h per step, and an optional parameter-free
RMS normalisation of each head's output (the papers' per-head GroupNorm / RMSNorm; its learnable
gain is absorbed by the model's output projection). Its cache, `RecurrentState`, holds S and the
position: constant memory per token.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_comparison.attention.base import LOW_PRECISION, AttentionKernel, check_new_tokens
from transformer_comparison.attention.cache import DecodeCache
from transformer_comparison.position.rope import Rotary

NORM_EPS = 1e-6  # RMS normalisation of the output, and L2 normalisation of q and k (delta rule)


def decay_factor(exponent: Tensor) -> Tensor:
    """exp(exponent) for exponents <= 0 (-inf gives 0, with a zero gradient).

    Subnormal results are left to the process: the commands that compute flush them to zero
    (`numerics.flush_subnormals`), and flushing them here as well cost about a quarter of gla's time.
    """
    return exponent.exp()


def rms_normalize(x: Tensor) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS)


def l2_normalize(x: Tensor) -> Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + NORM_EPS)


def to_chunks(x: Tensor, chunk: int) -> Tensor:
    """(B, H, n, ...) -> (B, H, n/C, C, ...), zero-padded at the end to a multiple of C."""
    n = x.shape[2]
    pad = -n % chunk
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (-1, chunk))


def from_chunks(x: Tensor, n: int) -> Tensor:
    """(B, H, N, C, ...) -> (B, H, n, ...), dropping the padding."""
    return x.flatten(2, 3)[:, :, :n]


def scan_states(updates: Tensor, decays: Tensor | None, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """States at the start of every chunk and after the last: S_{c+1} = decays_c * S_c + updates_c.

    updates: (B, H, N, d_k, d_v); decays: broadcastable to it (per chunk) or None (no decay);
    state: the state before the first chunk (B, H, d_k, d_v) or None (zeros).
    """
    s = updates.new_zeros(updates.shape[:2] + updates.shape[3:]) if state is None else state
    per_chunk = [None] * updates.shape[2] if decays is None else decays.unbind(2)  # unbind: one backward op, not one per chunk
    starts = []
    for update, decay in zip(updates.unbind(2), per_chunk):
        starts.append(s)
        s = update + (s if decay is None else decay * s)
    return torch.stack(starts, 2), s


def cumulative_log_decay(log_decay: Tensor, n: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Chunk-local inclusive cumulative log decays b (B', H, N, C) of log decays (B', H, n), padded
    positions not decaying; and the b to build the intra-chunk masks from: for a decay constant per
    head, given as (B', H, 1), one chunk's (B', H, 1, C), broadcast over the chunks."""
    b = to_chunks(log_decay.expand(-1, -1, n), chunk).cumsum(-1)
    if log_decay.shape[2] == 1 and n > 1:
        steps = torch.arange(1, chunk + 1, device=log_decay.device, dtype=log_decay.dtype)
        return b, log_decay[..., None] * steps
    return b, b


def causal_decay_mask(b: Tensor | None, chunk: int, strict: bool, like: Tensor) -> Tensor:
    """D_tj = exp(b_t - b_j) for j <= t (j < t if strict), else 0; b: (..., C) or None (D = 0/1 mask)."""
    pos = torch.arange(chunk, device=like.device)
    visible = pos[:, None] > pos[None, :] if strict else pos[:, None] >= pos[None, :]
    if b is None:
        return visible.to(like.dtype)
    return decay_factor((b[..., :, None] - b[..., None, :]).masked_fill(~visible, -math.inf))


def chunked_linear_scalar_decay(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk: int, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """o_t = q_t S_t, S_t = a_t S_{t-1} + k_t^T v_t with a scalar a_t per head and position.

    q, k: (B, H, n, d_k); v: (B, H, n, d_v); log_decay: (B or 1, H, n) or, constant per head,
    (B or 1, H, 1), <= 0; state: (B, H, d_k, d_v) or None. Within a chunk
    O = (Q K^T * D) V + diag(exp(b)) Q S_0, and the chunk adds (K * exp(b_C - b))^T V to exp(b_C) S_0.
    Returns (out (B, H, n, d_v), final state).
    """
    n = q.shape[2]
    chunk = min(chunk, n)
    qc, kc, vc = (to_chunks(x, chunk) for x in (q, k, v))
    b, b_mask = cumulative_log_decay(log_decay, n, chunk)  # (B', H, N, C), (B', H, N or 1, C)
    out = ((qc @ kc.mT) * causal_decay_mask(b_mask, chunk, False, q)) @ vc
    updates = (kc * decay_factor(b[..., -1:] - b)[..., None]).mT @ vc
    starts, final = scan_states(updates, decay_factor(b[..., -1, None, None]), state)
    out = out + (qc * decay_factor(b)[..., None]) @ starts
    return from_chunks(out, n), final


def linear_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token of `chunked_linear_*`: q, k, v (B, H, 1, d); log_decay (B', H, 1) or (B, H, 1, d_k)."""
    row_decay = decay_factor(log_decay[..., None] if log_decay.dim() == 3 else log_decay.mT)  # (.., d_k or 1, 1)
    s = k.mT @ v + (0.0 if state is None else row_decay * state)
    return q @ s, s


class RecurrentState(DecodeCache):
    """A recurrent mechanism's decoding memory: the state S (B, H, d_k, d_v) and the tokens seen."""

    def __init__(self) -> None:
        self.state: Tensor | None = None
        self.seen = 0

    @property
    def position(self) -> int:
        return self.seen

    def tensors(self) -> list[Tensor]:
        return [] if self.state is None else [self.state]

    def current(self, batch: int, heads: int, d_k: int, d_v: int, dtype: torch.dtype) -> Tensor | None:
        """The state before this call (None before the first), checked against the new tokens."""
        if self.state is not None and (tuple(self.state.shape) != (batch, heads, d_k, d_v) or self.state.dtype != dtype):
            raise ValueError(f"RecurrentState: the new tokens (batch {batch}, heads {heads}, head_dim {d_k}, {dtype}) "
                             f"do not match the state {tuple(self.state.shape)} {self.state.dtype}")
        return self.state

    def __repr__(self) -> str:
        shape = None if self.state is None else tuple(self.state.shape)
        return f"RecurrentState(state={shape}, seen={self.seen})"


def check_extras(name: str, extra: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless `extra` holds exactly the tensors `shapes` names, with those shapes."""
    missing, unknown = sorted(set(shapes) - set(extra)), sorted(set(extra) - set(shapes))
    if missing or unknown:
        wanted = ", ".join(f"{key} {shape}" for key, shape in shapes.items()) or "none"
        raise ValueError(f"{name} attention takes the outputs of its layer_inputs module ({wanted}); "
                         f"missing: {', '.join(missing) or 'none'}, unknown: {', '.join(unknown) or 'none'}")
    for key, shape in shapes.items():
        if tuple(extra[key].shape) != shape:
            raise ValueError(f"{name} attention: {key} must have shape {shape}, got {tuple(extra[key].shape)}")
    if "log_decay" in extra and bool((extra["log_decay"] > 0).any()):
        raise ValueError(f"{name} attention: log_decay must be <= 0 (a decay factor <= 1)")


class RecurrentKernel(AttentionKernel):
    """Base of the recurrent mechanisms: subclasses give the features, the gates and the two forms."""

    supports_non_causal = False
    has_entropy = False

    chunk_size: int
    output_norm: bool

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q, k as the recurrence reads them, before RoPE (scaled or L2-normalised)."""
        return q * q.shape[-1] ** -0.5, k

    def gates(self, extra: dict[str, Tensor], alibi_slopes: Tensor | None, q: Tensor, n: int) -> dict[str, Tensor | None]:
        """The decays / write strengths of n tokens (batch, heads, head_dim, dtype as q), ALiBi folded in,
        after checking `extra` (the layer_inputs outputs) against them."""
        raise NotImplementedError

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def step(self, q: Tensor, k: Tensor, v: Tensor, gates: dict, state: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inputs(self, q: Tensor, k: Tensor, v: Tensor, rope: Rotary | None) -> tuple[Tensor, Tensor, Tensor]:
        """Expand kv heads to the query heads, normalise, rotate (q end-aligned with k)."""
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        q, k = self.features(q, k)
        if rope is not None:
            q, k = rope.rotate_qk(q, k)
        return q, k, v

    def _finish(self, out: Tensor) -> Tensor:
        return rms_normalize(out) if self.output_norm else out

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, alibi_slopes: Tensor | None,
        rope: Rotary | None, need_entropy: bool, **extra: Tensor,
    ) -> tuple[Tensor, None]:
        nq, nk = q.shape[2], k.shape[2]
        gates = self.gates(extra, alibi_slopes, q, nk)
        q, k, v = self._inputs(q, k, v, rope)
        if nk == 0:
            return q * 0.0, None
        if nq < nk:  # the outputs of the earlier positions are computed and dropped
            q = F.pad(q, (0, 0, nk - nq, 0))
        out, _ = self.chunked(q, k, v, gates, None)
        return self._finish(out[:, :, nk - nq :]), None

    def new_cache(self) -> RecurrentState:
        """An empty state: its size never grows with the tokens seen."""
        return RecurrentState()

    def decode(
        self, q: Tensor, k: Tensor, v: Tensor, cache: DecodeCache, *,
        alibi_slopes: Tensor | None = None, rope: Rotary | None = None, **extra: Tensor,
    ) -> Tensor:
        """The n new tokens' outputs given the state of all earlier ones, then fold them into it.

        Equal to the last n rows of `self(q_all, k_all, v_all, **extra_all)`. RoPE rotates at the
        absolute positions cache.position .. cache.position + n - 1. One token: the recurrent step,
        O(d^2) per head; several (a prompt): the chunk-wise form starting from the carried state.
        """
        if not isinstance(cache, RecurrentState):
            raise ValueError(f"{self.name} attention decodes with a RecurrentState (from new_cache()), got {type(cache).__name__}")
        check_new_tokens(q, k, v, alibi_slopes)
        input_dtype = q.dtype
        if input_dtype in LOW_PRECISION:
            q, k, v = q.float(), k.float(), v.float()
            extra = {key: t.float() for key, t in extra.items()}
        if alibi_slopes is not None:
            alibi_slopes = alibi_slopes.to(device=q.device, dtype=q.dtype)
        batch, heads, n, _ = q.shape
        gates = self.gates(extra, alibi_slopes, q, n)
        q, k, v = self._inputs(q, k, v, None if rope is None else replace(rope, offset=cache.position))
        state = cache.current(batch, heads, k.shape[3], v.shape[3], q.dtype)
        form = self.step if n == 1 else self.chunked
        out, cache.state = form(q, k, v, gates, state)
        cache.seen += n
        return self._finish(out).to(input_dtype)


def alibi_log_decay(alibi_slopes: Tensor | None) -> Tensor | None:
    """ALiBi's bias -m_h |i - j| taken out of the exponent: an extra log decay -m_h per step, (1, H, 1)."""
    return None if alibi_slopes is None else -alibi_slopes.view(1, -1, 1)


def check_common_options(name: str, chunk_size: object, output_norm: object) -> tuple[int, bool]:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be an integer >= 1, got {chunk_size!r}")
    if not isinstance(output_norm, bool):
        raise ValueError(f"{name}: output_norm must be true or false, got {output_norm!r}")
    return chunk_size, output_norm


def chunk_counts(nk: int, chunk: int) -> tuple[int, int, int]:
    """(chunk length used, number of chunks, padded length) for nk positions."""
    used = max(1, min(chunk, nk))
    chunks = -(-nk // used)
    return used, chunks, chunks * used
