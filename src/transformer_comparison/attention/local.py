"""Local (sliding-window) attention (Beltagy et al. 2020, "Longformer"; Child et al. 2019,
"Generating Long Sequences with Sparse Transformers").

    out_i = sum_{p_i - w < j <= p_i} softmax_j(q_i . k_j / sqrt(d) + B_ij) v_j,   p_i = nk - nq + i

Causal only: each query sees its w most recent keys, itself included.

Computed in bands, never by masking an n x n matrix. The queries are cut into blocks of b (64); block
t attends to the span = (r + 1) b keys of key blocks t - r .. t, r = ceil((w - 1) / b), copied from
r + 1 shifted views of the zero-padded keys; one batched matmul covers a group of bands and every
head, and the window and the padding are masked inside each band. As in FlashAttention, a custom
autograd function processes the bands a group at a time (about 2^20 scores, so the working set stays
in cache), keeps only q, k, v and the output, and recomputes each group's probabilities in backward.
Time O(n span d) with span < w + 2b; memory O(n d) kept for backward plus one group's scores: linear
in n for a fixed window. Only the keys some query can reach are used, so decoding (nq = 1) costs
O(w d) whatever nk is.

Attention sinks (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"):
with `sinks` = s > 0 the first s tokens stay visible to every later query beside its window,

    query p sees the keys j <= p with p - j < w  or  j < s.

In training each band's scores get s more columns, the sink keys, scored against the band's queries
with their own per-band bias (hidden where the key is already inside the window, so nothing counts
twice) and normalised jointly with the band (one softmax over window and sinks); backward adds the
sink columns' gradients over every band. Time O(n (span + s) d), memory O(n d) kept plus O(n s) for
the sink bias. Decoding keeps the s sink keys and the last w - 1 keys (`SinkCache`): still constant.

Decoding keeps only the keys some future query can reach: a `KVCache` bounded to the last w - 1
keys between calls (plus the new tokens during a call), so its memory and the cost per token stay
constant however long the sequence; the cache's first position moves forward as keys drop out.
A single new token sees every key such a cache holds, so that step is plain softmax attention over
them (dot_product's kernel), without the band layout.

RoPE rotates q and k by their absolute positions before the bands are cut (the keys out of reach
are dropped first and the rotation offset moved to match). ALiBi adds -m_h (p_i - j) per band.
Grouped kv heads are read by folding each kv head's query heads into the rows of its bands.
The entropy is computed alongside the output (for logging) and is not differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor
from pydantic import Field
from torch.autograd.function import once_differentiable

from transformer_comparison.attention.base import (
    LOW_PRECISION,
    AttentionKernel,
    check_new_tokens,
    check_positive_int,
    group_queries,
    grouped_matmul,
    grouped_slopes,
    rotate_qk,
    ungroup,
    visible_pairs,
)
from transformer_comparison.attention.bias import position_bias
from transformer_comparison.attention.cache import DecodeCache, KVCache
from transformer_comparison.attention.dot_product import DotProductAttention
from transformer_comparison.attention.registry import register_attention
from transformer_comparison.position.rope import Rotary

BLOCK = 64  # queries per band: large enough for efficient matmuls, small next to typical windows
CHUNK_SCORES = 2**20  # band scores computed at once (4 MiB in float32): the unit kept in cache


@register_attention("local")
class LocalAttention(AttentionKernel):
    """Sliding-window causal attention; `window` keys per query, the query's own included."""

    display_order = 3  # where it is listed (tables, CLI help)

    supports_non_causal = False

    def __init__(self, *, window: Annotated[int, Field(ge=1)] = 32, sinks: Annotated[int, Field(ge=0)] = 0) -> None:
        self.window = check_positive_int("window", window, "local attention")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"local attention: sinks must be an integer >= 0, got {sinks!r}")
        self.sinks = sinks

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        """2 matmuls of 2 d FLOPs per (query, key) pair inside the window, and per visible sink."""
        beyond = visible_pairs(nq, nk, nk, True) - visible_pairs(nq, nk, self.window, True)  # pairs past the window
        sink_pairs = min(beyond, nq * self.sinks)
        return 4.0 * batch * heads * head_dim * (visible_pairs(nq, nk, self.window, True) + sink_pairs)

    def new_cache(self) -> DecodeCache:
        """A cache of the last window - 1 keys (and the sink keys): with the next token's own, all a query sees."""
        if self.sinks:
            return SinkCache(self.sinks, self.window)
        return KVCache(max_keys=self.window - 1)

    def decode(
        self, q: Tensor, k: Tensor, v: Tensor, cache: DecodeCache, *,
        alibi_slopes: Tensor | None = None, rope: Rotary | None = None, **extra: Tensor,
    ) -> Tensor:
        """As the default; one new token over a cache bounded to window - 1 keys is dense attention."""
        if self.sinks:
            if not isinstance(cache, SinkCache):
                raise ValueError(f"local attention with sinks decodes with a SinkCache (from new_cache()), got {type(cache).__name__}")
            return cache.decode(q, k, v, alibi_slopes=alibi_slopes, rope=rope)
        bounded = isinstance(cache, KVCache) and cache.max_keys is not None and cache.max_keys < self.window
        kernel = _DENSE if bounded and q.shape[2] == 1 else super()
        return kernel.decode(q, k, v, cache, alibi_slopes=alibi_slopes, rope=rope)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, alibi_slopes: Tensor | None,
        rope: Rotary | None, need_entropy: bool, **extra: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        heads, nq, head_dim = q.shape[1:]
        kv_heads, nk = k.shape[1], k.shape[2]
        window = max(1, min(self.window, nk))  # no query reaches further back than key 0
        first = max(0, nk - nq - window + 1)  # the first key any query sees
        sinks = min(self.sinks, nk) if nk - 1 >= window else 0  # sink keys some query may see beyond its window
        sink_k, sink_v = k[:, :, :sinks], v[:, :, :sinks]
        k, v = k[:, :, first:], v[:, :, first:]
        if rope is not None:
            sink_k = rope.rotate_qk(sink_k[:, :, :0], sink_k)[1] if sinks else sink_k
            rope = replace(rope, offset=rope.offset + first)
        q, k = rotate_qk(q, k, rope)

        layout = Bands.plan(nq, k.shape[2], window, heads // kv_heads)
        q_rows = layout.query_rows(q * (1.0 / math.sqrt(head_dim)))
        slopes = grouped_slopes(alibi_slopes, kv_heads)
        bias = layout.bias(slopes, q.dtype, q.device)
        sink = None
        if sinks:
            sink = (sink_k, sink_v, layout.sink_bias(slopes, sinks, nk - nq, q.dtype, q.device))
        out, entropy = BandedAttention.apply(
            q_rows, layout.key_blocks(k), layout.key_blocks(v), bias, layout, need_entropy, *(sink or (None,) * 3)
        )
        return layout.unband(out, nq), layout.unband(entropy, nq) if need_entropy else None


_DENSE = DotProductAttention()  # the single-token decoding step (see `LocalAttention.decode`)


@dataclass(frozen=True)
class Bands:
    """How queries and keys are cut: band t holds query block t (every head of a kv group) and key
    blocks t .. t + reach of the padded keys, i.e. positions reach * block + t_q - c before query t_q."""

    group: int
    block: int
    num_blocks: int
    reach: int
    window: int
    left_pad: int  # zero keys before position 0, hidden from the first bands
    right_pad: int  # zero queries and keys after the last position, to fill the last band

    @classmethod
    def plan(cls, nq: int, nk: int, window: int, group: int) -> Bands:
        """Bands for nq queries end-aligned with nk keys, nk <= nq + window - 1 (the keys in reach)."""
        block = max(1, min(nq, BLOCK))
        num_blocks = math.ceil(nq / block)
        reach = math.ceil((window - 1) / block)  # key blocks before its own that a band reads
        return cls(group, block, num_blocks, reach, window, reach * block - (nk - nq), num_blocks * block - nq)

    @property
    def span(self) -> int:
        return (self.reach + 1) * self.block

    def bias(self, slopes: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(G * block, span), or (KV, 1, G * block, span) with ALiBi: -m (p_i - j) inside the window
        and -inf outside it, the same for every band."""
        t = torch.arange(self.block, device=device)[:, None]
        c = torch.arange(self.span, device=device)[None, :]
        distance = self.reach * self.block + t - c  # p_i - j inside a band
        bias = position_bias(distance, causal=True, slopes=slopes, window=self.window, dtype=dtype)
        if slopes is None:
            return bias.repeat(self.group, 1)
        return bias.flatten(1, 2).unsqueeze(1)  # (KV, G, block, span) -> (KV, 1, G * block, span)

    def sink_bias(self, slopes: Tensor | None, sinks: int, first_query: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
        """(nb, G * block, sinks), or (KV, nb, G * block, sinks) with ALiBi: the bias of every band row
        (query position p) over the sink keys j < sinks, -inf unless the key is beyond the window
        (p - j >= window: inside it, the band holds that key already)."""
        p = first_query + torch.arange(self.num_blocks * self.block, device=device).view(self.num_blocks, 1, self.block, 1)
        offset = p - torch.arange(sinks, device=device)  # (nb, 1, block, sinks)
        hidden = offset < self.window
        if slopes is None:
            bias = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill(hidden, float("-inf"))
            return bias.expand(-1, self.group, -1, -1).flatten(1, 2)
        bias = (-(slopes.unsqueeze(1) * offset.to(dtype))).masked_fill(hidden, float("-inf"))  # (KV, nb, G, block, s)
        return bias.flatten(2, 3)

    def padding(self, bands: slice, device: torch.device) -> Tensor:
        """(len(bands), 1, span): where these bands read the zero keys padded before position 0."""
        band_start = torch.arange(bands.start, bands.stop, device=device)[:, None, None] * self.block
        return band_start + torch.arange(self.span, device=device) < self.left_pad

    def chunks(self, batch_heads: int) -> list[slice]:
        """Groups of consecutive bands whose scores, over every head, make about CHUNK_SCORES elements."""
        size = max(1, CHUNK_SCORES // (batch_heads * self.group * self.block * self.span))
        return [slice(start, min(start + size, self.num_blocks)) for start in range(0, self.num_blocks, size)]

    def gather(self, blocks: Tensor, bands: slice) -> Tensor:
        """(B, KV, nb + reach, block, D) key blocks -> (B, KV, len(bands), span, D) for those bands."""
        return torch.cat(
            [blocks[:, :, bands.start + shift : bands.stop + shift] for shift in range(self.reach + 1)], dim=3
        )

    def scatter_add(self, blocks: Tensor, bands: slice, grad: Tensor) -> None:
        """In place: the gradient of `gather`, (B, KV, len(bands), span, D), added into the key blocks."""
        for shift in range(self.reach + 1):
            key_block = slice(shift * self.block, (shift + 1) * self.block)
            blocks[:, :, bands.start + shift : bands.stop + shift] += grad[:, :, :, key_block]

    def probs(self, q_rows: Tensor, k_bands: Tensor, bias: Tensor, bands: slice,
              sink_k: Tensor | None = None, sink_bias: Tensor | None = None) -> Tensor:
        """Attention probabilities (B, KV, len(bands), G * block, span [+ sinks]) of some bands, given
        their keys; the sink columns, when there are sinks, come last and share the softmax."""
        scores = (q_rows[:, :, bands] @ k_bands.transpose(-1, -2)).add_(bias)
        if bands.start * self.block < self.left_pad:
            scores.masked_fill_(self.padding(bands, scores.device), float("-inf"))
        if sink_k is not None:
            sink_scores = (q_rows[:, :, bands] @ sink_k.unsqueeze(2).transpose(-1, -2)).add_(sink_bias[..., bands, :, :])
            scores = torch.cat((scores, sink_scores), dim=-1)
        return torch.softmax(scores, dim=-1)

    def query_rows(self, q: Tensor) -> Tensor:
        """(B, H, nq, D) -> (B, KV, nb, G * block, D): each band's queries, every head of the group."""
        batch, heads, _, head_dim = q.shape
        rows = F.pad(q, (0, 0, 0, self.right_pad)).view(
            batch, heads // self.group, self.group, self.num_blocks, self.block, head_dim
        )
        return rows.transpose(2, 3).flatten(3, 4)

    def key_blocks(self, k: Tensor) -> Tensor:
        """(B, KV, nk, D) -> (B, KV, nb + reach, block, D), zero-padded to whole blocks."""
        return F.pad(k, (0, 0, self.left_pad, self.right_pad)).unflatten(2, (-1, self.block))

    def unband(self, x: Tensor, nq: int) -> Tensor:
        """(B, KV, nb, G * block, ...) -> (B, H, nq, ...): back to heads and query positions."""
        x = x.unflatten(3, (self.group, self.block)).transpose(2, 3)
        return x.flatten(1, 2).flatten(2, 3)[:, :, :nq]


class BandedAttention(torch.autograd.Function):
    """Softmax attention of each band's queries over its keys, a few bands at a time.

    Saves q, k, v and the output only; backward recomputes each group of bands' probabilities
    (FlashAttention's recomputation, at band granularity), so no (n, span) tensor outlives a chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q_rows: Tensor, k_blocks: Tensor, v_blocks: Tensor, bias: Tensor, layout: Bands, need_entropy: bool,
        sink_k: Tensor | None = None, sink_v: Tensor | None = None, sink_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        out = torch.empty_like(q_rows)
        entropy = q_rows.new_empty(q_rows.shape[:-1]) if need_entropy else None
        for bands in layout.chunks(q_rows.shape[0] * q_rows.shape[1]):
            probs = layout.probs(q_rows, layout.gather(k_blocks, bands), bias, bands, sink_k, sink_bias)
            if sink_k is None:
                out[:, :, bands] = probs @ layout.gather(v_blocks, bands)
            else:
                band_probs, sink_probs = probs.split((layout.span, sink_k.shape[2]), dim=-1)
                out[:, :, bands] = band_probs @ layout.gather(v_blocks, bands) + sink_probs @ sink_v.unsqueeze(2)
            if entropy is not None:
                entropy[:, :, bands] = -torch.xlogy(probs, probs).sum(-1)
        ctx.layout = layout
        ctx.save_for_backward(q_rows, k_blocks, v_blocks, bias, out, sink_k, sink_v, sink_bias)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad_out: Tensor, _grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        q_rows, k_blocks, v_blocks, bias, out, sink_k, sink_v, sink_bias = ctx.saved_tensors
        layout: Bands = ctx.layout
        grad_q, grad_k, grad_v = torch.empty_like(q_rows), torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        grad_sink_k = None if sink_k is None else torch.zeros_like(sink_k)
        grad_sink_v = None if sink_v is None else torch.zeros_like(sink_v)
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)  # sum_j p_ij dL/dp_ij, per query
        for bands in layout.chunks(q_rows.shape[0] * q_rows.shape[1]):
            k_bands, v_bands = layout.gather(k_blocks, bands), layout.gather(v_blocks, bands)
            grad_out_bands = grad_out[:, :, bands]
            probs = layout.probs(q_rows, k_bands, bias, bands, sink_k, sink_bias)
            if sink_k is not None:
                probs, sink_probs = probs.split((layout.span, sink_k.shape[2]), dim=-1)
                grad_sink_v += (sink_probs.transpose(-1, -2) @ grad_out_bands).sum(2)
                grad_sink = (grad_out_bands @ sink_v.unsqueeze(2).transpose(-1, -2)).sub_(delta[:, :, bands]).mul_(sink_probs)
                grad_sink_k += (grad_sink.transpose(-1, -2) @ q_rows[:, :, bands]).sum(2)
            layout.scatter_add(grad_v, bands, probs.transpose(-1, -2) @ grad_out_bands)
            grad_scores = (grad_out_bands @ v_bands.transpose(-1, -2)).sub_(delta[:, :, bands]).mul_(probs)
            grad_q[:, :, bands] = grad_scores @ k_bands
            if sink_k is not None:
                grad_q[:, :, bands] += grad_sink @ sink_k.unsqueeze(2)
            layout.scatter_add(grad_k, bands, grad_scores.transpose(-1, -2) @ q_rows[:, :, bands])
        return grad_q, grad_k, grad_v, None, None, None, grad_sink_k, grad_sink_v, None


class SinkCache(DecodeCache):
    """Local attention's decoding memory with sinks: the first `sinks` keys for good, and a `KVCache` of
    the last window - 1 keys; keys are stored as the kernel reads them (RoPE-rotated at their positions)."""

    def __init__(self, sinks: int, window: int) -> None:
        self.sinks, self.window = sinks, window
        self.sink = KVCache()  # at most `sinks` keys, positions 0 .. sinks - 1
        self.recent = KVCache(max_keys=window - 1)

    @property
    def position(self) -> int:
        return self.recent.position

    def tensors(self) -> list[Tensor]:
        return self.sink.tensors() + self.recent.tensors()

    def decode(self, q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes: Tensor | None, rope: Rotary | None) -> Tensor:
        """n new tokens over the sinks, the window and themselves (dense: at most sinks + window - 1 + n keys)."""
        check_new_tokens(q, k, v, alibi_slopes)
        dtype = q.dtype
        work = torch.float32 if dtype in LOW_PRECISION else dtype
        start, n = self.position, q.shape[2]
        if rope is not None:
            q, k = replace(rope, offset=start).rotate_qk(q.to(work), k.to(work))
            q, k = q.to(dtype), k.to(dtype)
        keep = max(0, min(self.sinks - start, n))  # new tokens that are sinks
        if keep:
            self.sink.append(k[:, :, :keep], v[:, :, :keep])
        self.recent.append(k, v)
        held = min(self.sink.length, self.recent.first_position)  # sinks no longer in the recent keys
        keys = [self.sink.k[:, :, :held], self.recent.k] if held else [self.recent.k]
        values = [self.sink.v[:, :, :held], self.recent.v] if held else [self.recent.v]
        k_pos = torch.cat((torch.arange(held), torch.arange(self.recent.first_position, start + n))).to(q.device)
        q_pos = torch.arange(start, start + n, device=q.device)
        out = _dense_over(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), q_pos, k_pos, alibi_slopes,
                          self.window, self.sinks)
        self.recent.evict()
        return out

    def __repr__(self) -> str:
        return f"SinkCache(sinks={self.sink.length}/{self.sinks}, recent={self.recent!r})"


def _dense_over(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, alibi_slopes: Tensor | None,
                window: int, sinks: int) -> Tensor:
    """Softmax attention of queries at q_pos over keys at k_pos (any order): key j is visible to p when
    j <= p and (p - j < window or j < sinks); ALiBi -m |p - j|. Computed in float32 at least."""
    dtype = q.dtype
    work = torch.float32 if dtype in LOW_PRECISION else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    kv_heads = k.shape[1]
    offset = q_pos[:, None] - k_pos[None, :]
    hidden = (offset < 0) | ((offset >= window) & (k_pos[None, :] >= sinks))
    scores = grouped_matmul(group_queries(q, kv_heads), k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    slopes = grouped_slopes(None if alibi_slopes is None else alibi_slopes.to(work), kv_heads)
    if slopes is not None:
        scores = scores - slopes * offset.abs().to(work)
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return ungroup(grouped_matmul(probs, v)).to(dtype)
