"""FlashAttention: exact softmax attention computed tile by tile (Dao et al. 2022, "FlashAttention:
Fast and Memory-Efficient Exact Attention with IO-Awareness"; Dao 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning").

    out = softmax(Q K^T / sqrt(d) + B) V,   B_ij = -m_h |i - j| with ALiBi, -inf where causal hides j > i,

the same maths as `dot_product`, never materialising the n x n scores. Queries are cut into blocks of
`block_size` rows and the visible keys into blocks of `block_size` columns. The forward pass keeps, per
query row, a normaliser l and an unnormalised output, summed over key blocks with every score of row i
shifted by one fixed upper bound c_i = |q_i| max_j |k_j| (Cauchy-Schwarz; the "unified max value" of
FlashDecoding++, Hong et al. 2023): p = 2^(s - c) <= 1 never overflows and is never rescaled, so a tile
costs its two matmuls (the shift added in the first), one exp2 and one row sum. A query block in which
the bound is so loose that some row's l falls below sqrt(tiny) (2^-63 in float32) is recomputed with the
online softmax of FlashAttention: a running max m, with l and the output rescaled by 2^(m_old - m_new)
whenever a key block raises it (every block takes it under torch.compile, whose graphs cannot branch
on a value). Either way it saves only q, k, v, the output and the log-sum-exp
L = c + log2 l (or m + log2 l). Scores are kept in base 2, as FlashAttention-2 does:
log2(e) is folded into the query scale (and the ALiBi slopes), so every tile takes exp2, which is
about twice as fast as exp on a CPU (`_tile_exp2_`). The backward pass recomputes each score tile
from them, P = 2^(S - L), and uses the FlashAttention-2 gradient with D_i = rowsum(dO_i * O_i):

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ += dS K / sqrt(d),   dK += dS^T Q / sqrt(d).

Keys are cut at multiples of `block_size`, the same blocks for every query block, so the backward
pass sums dK and dV per key block in place. Causal key blocks entirely above the diagonal are skipped
and only the diagonal block is masked; the ALiBi bias is built per tile. Grouped K/V heads are read
by folding each group of query heads into the rows of a tile, so K and V are never repeated. RoPE rotates q and k before the kernel
(autograd differentiates the rotation). The attention entropy H_i = L_i - sum_j p_ij s_ij is
accumulated online like the output and needs no n x n row either.

Time O(n^2 d) like `dot_product` (about half the tiles when causal); activation memory O(n d) saved
for backward plus O(block_size^2) per head of working memory, instead of O(n^2). In tiles with a bias
(ALiBi, the causal mask) probabilities below 4x the smallest normal number (4.7e-38 in float32) are
flushed to 0, which keeps far ALiBi tiles and masked entries off slow subnormal arithmetic (see
`_exp2_`); unbiased tiles take a plain exp2 (`_tile_exp2_`).

`use_sdpa=True` dispatches to torch's `scaled_dot_product_attention` where that is the same maths
without an n x n mask: no entropy requested, and either nq == nk without ALiBi or a single query
(decoding, where the ALiBi bias is one row). A single query without entropy (a decoding step) always
takes SDPA, so decoding is fast whatever the option; everything else takes the block-wise path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.autograd.function import once_differentiable

from transformer_comparison.attention.base import AttentionKernel, check_positive_int, rotate_qk
from transformer_comparison.attention.bias import position_bias
from transformer_comparison.attention.registry import register_attention
from transformer_comparison.position.rope import Rotary

DEFAULT_BLOCK_SIZE = 256  # fastest of 64..512 at n = 4096 on 2 CPU threads; tiles of 256 x 256 per head
LOG2_E, LN_2 = 1.0 / math.log(2.0), math.log(2.0)  # scores in base 2: s / ln 2, and back


@dataclass(frozen=True)
class _Tiling:
    """Geometry of the tiles: batch, kv heads, queries per kv head (groups), the query offset nk - nq,
    the block size, causality and ALiBi slopes in base 2 (times log2 e), grouped to (KV, 1, G, 1)."""

    batch: int
    kv_heads: int
    groups: int
    query_offset: int
    block: int
    causal: bool
    slopes: Tensor | None

    @classmethod
    def build(cls, q: Tensor, k: Tensor, alibi_slopes: Tensor | None, causal: bool, block: int) -> _Tiling:
        batch, heads, nq, _ = q.shape
        kv_heads, nk = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        slopes = None if alibi_slopes is None else alibi_slopes.view(kv_heads, 1, groups, 1) * LOG2_E
        return cls(batch, kv_heads, groups, nk - nq, block, causal, slopes)

    def query_blocks(self, nq: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.block, nq)) for start in range(0, nq, self.block)]

    def key_blocks(self, q_start: int, q_end: int, nk: int) -> list[tuple[int, int, bool]]:
        """(start, end, masked) of the key blocks a query block sees: the keys cut at multiples of the
        block size, the same blocks for every query block (the backward pass accumulates per block).

        Causal: blocks ending at or before the query block's first position are fully visible, later
        keys up to its last position are masked (one diagonal block when nq == nk), the rest skipped.
        """
        if not self.causal:
            return [(start, min(start + self.block, nk), False) for start in range(0, nk, self.block)]
        first, last = self.query_offset + q_start, self.query_offset + q_end
        blocks = []
        for start in range(0, last, self.block):
            end = min(start + self.block, last)
            blocks.append((start, end, end > first))
        return blocks

    def biased(self, masked: bool) -> bool:
        """Whether a tile's scores carry a bias (ALiBi or the causal mask), which can put them far below
        the row's max; unbiased tiles take a plain exp2 (see `_tile_exp2_`)."""
        return masked or self.slopes is not None

    def scores(
        self, q_rows: Tensor, k_block: Tensor, q_start: int, k_start: int, masked: bool, shift: Tensor | None = None
    ) -> Tensor:
        """Biased, masked scores of one tile in base 2, (B*KV, nq_block*G, nk_block); q_rows is pre-scaled
        by log2(e) / sqrt(d). shift (B*KV, nq_block*G, 1), if given, is added to every row in the matmul.
        torch.bmm, not `@`: torch.matmul's extra handling took 723 against 607 us on a 256 x 256 tile."""
        scores = torch.bmm(q_rows, k_block.mT) if shift is None else torch.baddbmm(shift, q_rows, k_block.mT)
        if not self.biased(masked):
            return scores
        n_rows, n_keys = q_rows.shape[1] // self.groups, k_block.shape[1]
        q_pos = torch.arange(n_rows, device=scores.device) + (self.query_offset + q_start)
        k_pos = torch.arange(k_start, k_start + n_keys, device=scores.device)
        offset = (q_pos[:, None] - k_pos[None, :])[:, None, :]  # (n_rows, 1, n_keys), broadcast over G
        grouped = scores.view(self.batch, self.kv_heads, n_rows, self.groups, n_keys)
        grouped.add_(position_bias(offset, causal=masked, slopes=self.slopes, dtype=scores.dtype))
        return scores


def _exp2_(x: Tensor) -> Tensor:
    """2^x in place, with results below 4x the smallest normal number (4.7e-38 in float32) set to 0.

    Arguments that underflow (far ALiBi distances, masked -inf) push torch's vectorised exp2 off its
    fast path, and subnormal probabilities slow the matmuls that read them ~30x on x86. Clamping the
    argument to log2(tiny) + 1 keeps exp2 fast; the threshold then flushes those values to exactly 0.
    """
    tiny = torch.finfo(x.dtype).tiny
    return F.threshold_(x.clamp_(min=math.log2(tiny) + 1.0).exp2_(), 4 * tiny, 0.0)


def _tile_exp2_(shifted: Tensor, biased: bool) -> Tensor:
    """2^x in place of a tile's base-2 scores minus their row max (or log-sum-exp): guarded by `_exp2_`
    where the tile carries a bias or mask, plain where it does not. Unbiased scores sit within a few
    units of their max for any trained model, so the guard's two extra passes (8% of the kernel at
    n = 4096) buy nothing there; should one underflow, exp2 still returns the right (subnormal) value,
    and the commands flush those to 0 (`numerics.flush_subnormals`). exp2 rather than exp: torch's
    vectorised exp2 took 0.53x exp's time on a 8 x 256 x 256 tile here (150 against 280 us, 2 threads)."""
    return _exp2_(shifted) if biased else shifted.exp2_()


class _SoftmaxSums:
    """What the forward pass keeps per query row (rows of shape (B*KV, rows, .)) for scores s in base 2
    shifted by c (a fixed bound or the running max): l = sum of p = 2^(s - c), acc = sum of p v, and
    plogp = sum of p ln p (in nats), kept only when the entropy is wanted."""

    shift: Tensor
    l: Tensor
    acc: Tensor
    plogp: Tensor | None

    def output(self) -> Tensor:
        return self.acc / self.l

    def log_sum_exp(self) -> Tensor:
        """log2 of sum_j 2^(s_j): what the backward pass subtracts from the base-2 scores."""
        return self.shift + self.l.log2()

    def entropy(self) -> Tensor:
        return self.l.log() - self.plogp / self.l


class _OnlineSoftmax(_SoftmaxSums):
    """Running softmax of one query block over successive key blocks, shifted by the running max m
    (`shift`), rescaling l, acc and plogp whenever a block raises it. Score tiles are consumed
    (overwritten in place)."""

    def __init__(self, scores: Tensor, v_block: Tensor, need_entropy: bool, biased: bool) -> None:
        self.shift = scores.amax(-1, keepdim=True)
        p = _tile_exp2_(scores.sub_(self.shift), biased)
        self.l = p.sum(-1, keepdim=True)
        self.acc = torch.bmm(p, v_block)
        self.plogp = torch.xlogy(p, p).sum(-1, keepdim=True) if need_entropy else None

    def update(self, scores: Tensor, v_block: Tensor, biased: bool) -> None:
        m, m_new = self.shift, torch.maximum(self.shift, scores.amax(-1, keepdim=True))
        p = _tile_exp2_(scores.sub_(m_new), biased)
        alpha = (m - m_new).exp2_()
        if self.plogp is not None:  # p ln p of the old terms, now divided by 2^(m_new - m)
            shifted = self.plogp - (m_new - m) * LN_2 * self.l
            self.plogp = shifted.mul_(alpha).add_(torch.xlogy(p, p).sum(-1, keepdim=True))
        self.l = self.l.mul_(alpha).add_(p.sum(-1, keepdim=True))
        self.acc = self.acc.mul_(alpha).baddbmm_(p, v_block)
        self.shift = m_new


class _ShiftedSoftmax(_SoftmaxSums):
    """Softmax sums of one query block with each row shifted by a fixed upper bound c of its scores
    (`_score_bound`) instead of its running max (the "unified max value" of FlashDecoding++, Hong et al.
    2023). Every p = 2^(s - c) is at most 1, so nothing overflows and nothing is ever rescaled: the shift
    is added in the score matmul, and a tile costs one exp2 and one sum, where the online softmax also
    takes a row max, a subtraction and a rescaling.

    A loose bound makes every p of a row small; a row whose l falls below `guard` (2^-63 in float32)
    could lose terms to underflow, and its block is recomputed with the running max (`_block_softmax`).
    Above it, the largest of a row's n terms is at least guard / n, so each term lost to underflow (below
    tiny, 2^-126) is under n 2^-63 of it, and all of them together under n^2 2^-63 of the sum: below
    float32's precision (2^-24) for n up to 2^19.
    """

    def __init__(self, bound: Tensor, p: Tensor, v_block: Tensor, need_entropy: bool) -> None:
        """From the first tile's p = 2^(s - bound), (B*KV, rows, keys), and its values."""
        self.shift = bound
        self.l = p.sum(-1, keepdim=True)
        self.acc = torch.bmm(p, v_block)
        self.plogp = torch.xlogy(p, p).sum(-1, keepdim=True) if need_entropy else None

    def update(self, p: Tensor, v_block: Tensor) -> None:
        self.l.add_(p.sum(-1, keepdim=True))
        self.acc.baddbmm_(p, v_block)
        if self.plogp is not None:
            self.plogp.add_(torch.xlogy(p, p).sum(-1, keepdim=True))

    @property
    def guard(self) -> float:
        """sqrt(tiny) of the sums' dtype: 2^-63 in float32."""
        return torch.finfo(self.l.dtype).tiny ** 0.5

    def underflowed(self) -> bool:
        """Whether some row's sum fell below the guard; never on the meta device, whose tensors hold no
        values (the memory estimate traces the forward pass there, `resources.training_memory`)."""
        return not self.l.is_meta and bool((self.l < self.guard).any())


def _to_rows(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, n, D) -> (B*KV, n*G, D): row i*G + g is query i of head g of its kv head's group."""
    batch, heads, n, dim = x.shape
    grouped = x.view(batch, kv_heads, heads // kv_heads, n, dim).transpose(2, 3)
    return grouped.reshape(batch * kv_heads, n * (heads // kv_heads), dim)


def _from_rows(x: Tensor, batch: int, heads: int) -> Tensor:
    """Inverse of `_to_rows` for (B*KV, n*G, ...) -> (B, H, n, ...)."""
    kv_heads = x.shape[0] // batch
    groups = heads // kv_heads
    n = x.shape[1] // groups
    grouped = x.view(batch, kv_heads, n, groups, *x.shape[2:]).transpose(2, 3)
    return grouped.reshape(batch, heads, n, *x.shape[2:])


def _score_bound(q_rows: Tensor, k: Tensor) -> Tensor:
    """|q_i| max_j |k_j| per row, (B*KV, nq*G, 1): no base-2 score of row i exceeds it (Cauchy-Schwarz;
    the ALiBi bias and the causal mask only lower scores)."""
    key_norm = torch.linalg.vector_norm(k, dim=-1).amax(-1)
    return torch.linalg.vector_norm(q_rows, dim=-1, keepdim=True) * key_norm[:, None, None]


def _block_softmax(
    q_block: Tensor, k: Tensor, v: Tensor, bound: Tensor, tiling: _Tiling, q_start: int, q_end: int, need_entropy: bool
) -> _SoftmaxSums:
    """Softmax sums of one query block over its key blocks: shifted by the fixed bound, or by the running
    max where the bound left some row's sum below `_ShiftedSoftmax.guard`, and under torch.compile,
    whose graphs cannot branch on a value."""
    key_blocks = tiling.key_blocks(q_start, q_end, k.shape[1])
    if not torch.compiler.is_compiling():
        shifted, neg_bound = None, bound.neg()
        for k_start, k_end, masked in key_blocks:
            scores = tiling.scores(q_block, k[:, k_start:k_end], q_start, k_start, masked, shift=neg_bound)
            p = _tile_exp2_(scores, tiling.biased(masked))
            if shifted is None:
                shifted = _ShiftedSoftmax(bound, p, v[:, k_start:k_end], need_entropy)
            else:
                shifted.update(p, v[:, k_start:k_end])
        if not shifted.underflowed():
            return shifted
    online = None
    for k_start, k_end, masked in key_blocks:
        scores = tiling.scores(q_block, k[:, k_start:k_end], q_start, k_start, masked)
        if online is None:
            online = _OnlineSoftmax(scores, v[:, k_start:k_end], need_entropy, tiling.biased(masked))
        else:
            online.update(scores, v[:, k_start:k_end], tiling.biased(masked))
    return online


def _flash_forward(
    q_rows: Tensor, k: Tensor, v: Tensor, tiling: _Tiling, need_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Output (B*KV, nq*G, D), base-2 log-sum-exp (B*KV, nq*G, 1) and entropy like it (or None)."""
    groups = tiling.groups
    out = torch.empty_like(q_rows)
    lse = q_rows.new_empty(*q_rows.shape[:2], 1)
    entropy = torch.empty_like(lse) if need_entropy else None
    bound = _score_bound(q_rows, k)
    for q_start, q_end in tiling.query_blocks(q_rows.shape[1] // groups):
        rows = slice(q_start * groups, q_end * groups)
        q_block = q_rows[:, rows].contiguous()  # a strided slice made every tile's matmul slower
        softmax = _block_softmax(q_block, k, v, bound[:, rows], tiling, q_start, q_end, need_entropy)
        out[:, rows] = softmax.output()
        lse[:, rows] = softmax.log_sum_exp()
        if entropy is not None:
            entropy[:, rows] = softmax.entropy()
    return out, lse, entropy


def _flash_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, tiling: _Tiling, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (rows layout for q, unscaled) by recomputing each tile's probabilities from the base-2
    log-sum-exp; q is (B, H, nq, D), the others are in the rows layout.

    dK and dV are summed per key block into contiguous buffers (in-place baddbmm_, faster than adding
    into a strided slice), joined once the scaled queries are freed: the peak is no higher for it.
    dK is summed against the base-2 queries, q log2(e) / sqrt(d), and multiplied by ln 2 once at the end."""
    q_rows = _to_rows(q, tiling.kv_heads) * (scale * LOG2_E)
    groups, nk = tiling.groups, k.shape[1]
    neg_delta, neg_lse = (grad_out * out).sum(-1, keepdim=True).neg_(), lse.neg()  # added in the matmuls
    grad_q = torch.empty_like(q_rows)
    key_starts = range(0, nk, tiling.block)
    grad_k_blocks = [k.new_zeros(k.shape[0], min(tiling.block, nk - start), k.shape[2]) for start in key_starts]
    grad_v_blocks = [torch.zeros_like(block) for block in grad_k_blocks]
    for q_start, q_end in tiling.query_blocks(q_rows.shape[1] // groups):
        rows = slice(q_start * groups, q_end * groups)
        q_block, grad_out_block = q_rows[:, rows].contiguous(), grad_out[:, rows].contiguous()
        neg_lse_block, neg_delta_block = neg_lse[:, rows].contiguous(), neg_delta[:, rows].contiguous()
        grad_q_block = torch.zeros_like(q_block)
        for k_start, k_end, masked in tiling.key_blocks(q_start, q_end, nk):
            keys = slice(k_start, k_end)
            scores = tiling.scores(q_block, k[:, keys], q_start, k_start, masked, shift=neg_lse_block)
            probs = _tile_exp2_(scores, tiling.biased(masked))
            grad_scores = torch.baddbmm(neg_delta_block, grad_out_block, v[:, keys].mT).mul_(probs)
            grad_q_block.baddbmm_(grad_scores, k[:, keys])
            block, width = k_start // tiling.block, k_end - k_start  # a causal block can end early
            grad_v_blocks[block][:, :width].baddbmm_(probs.mT, grad_out_block)
            grad_k_blocks[block][:, :width].baddbmm_(grad_scores.mT, q_block)
        grad_q[:, rows] = grad_q_block
    del q_rows, q_block, grad_q_block
    return grad_q, _join(grad_k_blocks).mul_(LN_2), _join(grad_v_blocks)


def _join(blocks: list[Tensor]) -> Tensor:
    """Concatenate key blocks (B*KV, block, D) along the keys and free them."""
    joined = torch.cat(blocks, dim=1)
    blocks.clear()
    return joined


class _FlashFunction(torch.autograd.Function):
    """(q, k, v) -> (out, entropy); saves q, k, v, out and the log-sum-exp only."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None, causal: bool, block: int, need_entropy: bool
    ) -> tuple[Tensor, Tensor]:
        tiling = _Tiling.build(q, k, alibi_slopes, causal, block)
        batch, heads = q.shape[:2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        k_flat, v_flat = k.flatten(0, 1), v.flatten(0, 1)
        q_rows = _to_rows(q, tiling.kv_heads) * (scale * LOG2_E)  # base-2 scores
        out, lse, entropy = _flash_forward(q_rows, k_flat, v_flat, tiling, need_entropy)
        del q_rows  # not saved: the backward pass scales q again
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiling, ctx.scale = tiling, scale
        entropy = _from_rows(entropy, batch, heads).squeeze(-1) if need_entropy else q.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return _from_rows(out, batch, heads), entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        tiling, scale = ctx.tiling, ctx.scale
        batch, heads = q.shape[:2]
        grad_rows = _to_rows(grad_out, tiling.kv_heads).contiguous()
        grad_q, grad_k, grad_v = _flash_backward(q, k.flatten(0, 1), v.flatten(0, 1), out, lse, grad_rows, tiling, scale)
        grad_q = _from_rows(grad_q.mul_(scale), batch, heads)
        return grad_q, grad_k.view_as(k), grad_v.view_as(v), None, None, None, None


def _sdpa_applies(nq: int, nk: int, alibi: bool, need_entropy: bool) -> bool:
    """SDPA is exact here with no n x n mask: a single (decoding) query, or aligned queries without ALiBi."""
    return not need_entropy and (nq == 1 or (nq == nk and not alibi))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, alibi_slopes: Tensor | None) -> Tensor:
    nq, nk = q.shape[2], k.shape[2]
    bias = None
    if alibi_slopes is not None:  # one query row at position nk - 1: bias -m_h (nk - 1 - j)
        distance = torch.arange(nk - 1, -1, -1, device=q.device, dtype=q.dtype)
        bias = (-alibi_slopes[:, None, None] * distance).unsqueeze(0)
    is_causal = causal and nq > 1  # a single end-aligned query sees every key
    grouped = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal, enable_gqa=grouped)


@register_attention("flash")
class FlashAttention(AttentionKernel):
    """Exact softmax attention in `block_size` x `block_size` tiles, never materialising n x n scores.

    use_sdpa: dispatch to torch's fused scaled_dot_product_attention where it is exact (see module doc).
    """

    display_order = 5  # where it is listed (tables, CLI help)

    def __init__(self, *, block_size: Annotated[int, Field(ge=1)] = DEFAULT_BLOCK_SIZE, use_sdpa: bool = False) -> None:
        self.block_size = check_positive_int("block_size", block_size, "flash")
        if not isinstance(use_sdpa, bool):
            raise ValueError(f"flash: use_sdpa must be True or False, got {use_sdpa!r}")
        self.use_sdpa = use_sdpa

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, alibi_slopes: Tensor | None,
        rope: Rotary | None, need_entropy: bool, **extra: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        q, k = rotate_qk(q, k, rope)
        single_query = q.shape[2] == 1  # a decoding step: one row, SDPA is the same maths with no n x n mask
        if (self.use_sdpa or single_query) and _sdpa_applies(q.shape[2], k.shape[2], alibi_slopes is not None, need_entropy):
            return _sdpa(q, k, v, causal, alibi_slopes), None
        out, entropy = _FlashFunction.apply(q, k, v, alibi_slopes, causal, self.block_size, need_entropy)
        return out, (entropy if need_entropy else None)
