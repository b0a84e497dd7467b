"""The one signature every attention kernel shares, and the checks and helpers behind it.

    out = attn(q, k, v, causal=True, alibi_slopes=None, rope=None)
    out, entropy = attn(q, k, v, causal=True, return_entropy=True)

q: (batch, heads, nq, head_dim); k, v: (batch, kv_heads, nk, head_dim), kv_heads dividing heads,
query head h reads kv head h // (heads // kv_heads). Queries are end-aligned with the keys: query i
sits at position nk - nq + i, so nq == nk in training and nq == 1 when decoding from a cache.
Causal: query at position p sees keys j <= p. alibi_slopes: (heads,), bias -m_h |p - j|.
rope: a `position.Rotary`, applied as `position/__init__.py` describes.
entropy: (batch, heads, nq) in nats, of the attention distribution the mechanism really uses.
Low-precision inputs (bf16, fp16) are computed in float32 and the output is cast back.

What the rest of the program needs to know about a mechanism it reads from the kernel class, never
from a list of names elsewhere (docs/architecture.md, "Adding a mechanism"):

- construction options: the keyword-only parameters of `__init__`, with their types, bounds
  (`Annotated[int, Field(ge=1)]`) and defaults; the config schema and the CLI are derived from them;
- `kv_heads(num_heads, num_kv_heads)`: how many key/value heads the model projects;
- `flops(...)`: the forward FLOP model the benchmark and the run accounting use;
- `layer_inputs(d_model, num_heads, head_dim)`: learned projections of the layer input the
  mechanism needs beyond q, k and v (gates, decays, write strengths), as an `nn.Module` the model
  owns; its outputs reach `attend` and `decode` as keyword arguments (`**extra`);
- `has_entropy`: False for mechanisms without an attention distribution (their entropy is None);
- `refused_positions`: encoding name -> one-line reason, for combinations that make no sense;
- `new_cache` / `decode`: what decoding keeps.

Decoding (docs/decoding.md), one cache per layer:

    cache = attn.new_cache()
    out = attn.decode(q, k_new, v_new, cache, alibi_slopes=None, rope=None)

q, k_new, v_new: the n new tokens' projections (n >= 1: a prompt's prefill, then one token at a
time), at absolute positions cache.position .. cache.position + n - 1. The default (every softmax
mechanism) appends k_new, v_new to a `KVCache` and calls the kernel itself over the cached keys,
which is exact because queries are end-aligned; a mechanism overrides `new_cache` and `decode` to
store something else (local: only the keys in reach; linear: a recurrent state). With RoPE the
cache holds keys rotated at their absolute positions: softmax kernels apply RoPE as `rotate_qk`
before the scores, so rotating the new q and k once and calling the kernel with rope=None is the
same attention, and a step never re-rotates the n cached keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from transformer_comparison.attention.cache import DecodeCache, KVCache
from transformer_comparison.position.rope import Rotary

LOW_PRECISION = (torch.bfloat16, torch.float16)


class AttentionKernel(ABC):
    """Base class: subclasses set `name` and implement `attend` on validated, full-precision inputs."""

    name: ClassVar[str]
    supports_non_causal: ClassVar[bool] = True
    has_entropy: ClassVar[bool] = True  # False: no attention distribution; entropy is None
    is_baseline: ClassVar[bool] = False  # the mechanism the others are compared against (dot_product)
    refused_positions: ClassVar[dict[str, str]] = {}  # encoding -> why this mechanism refuses it

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        alibi_slopes: Tensor | None = None,
        rope: Rotary | None = None,
        return_entropy: bool = False,
        **extra: Tensor,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        check_qkv(q, k, v, alibi_slopes, causal)
        if not causal and not self.supports_non_causal:
            raise ValueError(f"{self.name} attention is causal only; use causal=True")
        input_dtype = q.dtype
        if input_dtype in LOW_PRECISION:
            q, k, v = q.float(), k.float(), v.float()
            extra = {key: t.float() if t.is_floating_point() else t for key, t in extra.items()}
        if alibi_slopes is not None:
            alibi_slopes = alibi_slopes.to(device=q.device, dtype=q.dtype)
        out, entropy = self.attend(
            q, k, v, causal=causal, alibi_slopes=alibi_slopes, rope=rope, need_entropy=return_entropy, **extra
        )
        out = out.to(input_dtype)
        return (out, entropy) if return_entropy else out

    def kv_heads(self, num_heads: int, num_kv_heads: int | None) -> int:
        """Key/value heads the model projects for `num_heads` query heads; `num_kv_heads` is the
        config's attention.num_kv_heads (None: one per query head). Raises ValueError if invalid."""
        if num_kv_heads is None:
            return num_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"attention.num_kv_heads={num_kv_heads} must divide model.num_heads={num_heads}; "
                             f"allowed: {divisors(num_heads)}")
        return num_kv_heads

    def flops(self, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, causal: bool) -> float:
        """Forward FLOPs of one call (multiply-add = 2), by default dense softmax attention's:
        2 matmuls of 2 d FLOPs per (query, key) pair the mask leaves visible."""
        return 4.0 * batch * heads * head_dim * visible_pairs(nq, nk, nk, causal)

    def layer_inputs(self, d_model: int, num_heads: int, head_dim: int) -> nn.Module | None:
        """Learned projections of the layer input x (batch, n, d_model) beyond q, k and v: a module
        whose forward(x) returns a dict of tensors that `attend` and `decode` receive as keyword
        arguments. The model creates it once per layer and owns its parameters. None: no extras."""
        return None

    @abstractmethod
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        alibi_slopes: Tensor | None,
        rope: Rotary | None,
        need_entropy: bool,
        **extra: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Return (out, entropy or None). Softmax kernels call `rotate_qk` first; `extra` holds the
        outputs of `layer_inputs` (empty for the softmax family)."""

    def new_cache(self) -> DecodeCache:
        """An empty decoding cache for one layer: keys and values of every token seen (see `decode`)."""
        return KVCache()

    def decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cache: DecodeCache,
        *,
        alibi_slopes: Tensor | None = None,
        rope: Rotary | None = None,
        **extra: Tensor,
    ) -> Tensor:
        """Causal attention of n new tokens over everything the cache has seen, then remember them.

        q: (batch, heads, n, head_dim); k, v: (batch, kv_heads, n, head_dim), the same n new tokens.
        Returns (batch, heads, n, head_dim), what `self(q_all, k_all, v_all, causal=True)` gives for
        the last n rows over the whole sequence. RoPE rotates at the cache's absolute positions
        cache.position .. cache.position + n - 1 (`rope.offset` is ignored: the cache counts from 0).
        """
        if not isinstance(cache, KVCache):
            raise ValueError(f"{self.name} attention decodes with a KVCache (from new_cache()), got {type(cache).__name__}")
        check_new_tokens(q, k, v, alibi_slopes)
        if rope is not None:  # rotated once, in float32 at least, and stored rotated in the input dtype
            dtype = q.dtype
            work = torch.float32 if dtype in LOW_PRECISION else dtype
            q, k = replace(rope, offset=cache.position).rotate_qk(q.to(work), k.to(work))
            q, k = q.to(dtype), k.to(dtype)
        cache.append(k, v)
        out = self(q, cache.k, cache.v, causal=True, alibi_slopes=alibi_slopes)
        cache.evict()
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


def rotate_qk(q: Tensor, k: Tensor, rope: Rotary | None) -> tuple[Tensor, Tensor]:
    """Apply RoPE to q and k before the scores (every softmax kernel); identity without it."""
    return (q, k) if rope is None else rope.rotate_qk(q, k)


def check_positive_int(name: str, value: object, mechanism: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{mechanism}: {name} must be an integer >= 1, got {value!r}")
    return value


def check_qkv(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None, causal: bool) -> None:
    """Raise ValueError naming the problem when shapes do not follow the kernel API."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{label} must have 4 dims (batch, heads, n, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, heads, nq, head_dim = q.shape
    _, kv_heads, nk, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads}); valid kv_heads: {divisors(heads)}")
    if nq > nk:
        raise ValueError(f"q has more positions ({nq}) than k ({nk}); queries are end-aligned with the keys")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (heads,):
        raise ValueError(f"alibi_slopes must have shape ({heads},), got {tuple(alibi_slopes.shape)}")


def check_new_tokens(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None) -> None:
    """The kernel API's checks for decoding, which also needs one query per new key."""
    check_qkv(q, k, v, alibi_slopes, causal=True)
    if q.shape[2] != k.shape[2] or q.shape[2] < 1:
        raise ValueError(f"decode takes the same n >= 1 new tokens in q, k and v, got {q.shape[2]} queries and {k.shape[2]} keys")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def visible_pairs(nq: int, nk: int, width: int, causal: bool) -> float:
    """(query, key) pairs with 0 <= p_i - j < width for queries end-aligned with the keys (query i at
    position p_i = nk - nq + i): the pairs a causal softmax mechanism scores. Not causal: the band
    on both sides, 2 * causal - nq (exact for nq == nk)."""
    first, last, reach = nk - nq, nk - 1, width - 1  # a query at p >= reach sees `width` keys
    ramp_end = min(last, reach - 1)
    ramp = (ramp_end * (ramp_end + 1) - (first - 1) * first) / 2 + (ramp_end - first + 1) if ramp_end >= first else 0.0
    flat = width * max(0, last - max(first, reach) + 1)
    one_sided = ramp + flat
    return float(one_sided) if causal else float(2 * one_sided - nq)


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """(B, H, n, D) -> (B, kv_heads, H // kv_heads, n, D): the queries that share one kv head, together.

    Scores are then `grouped_matmul(q5, k.transpose(-1, -2))`, which folds the group into the rows.
    (A broadcasting `q5 @ k.unsqueeze(2)...` would make torch.matmul copy k once per group.)
    """
    batch, heads, n, head_dim = q.shape
    return q.view(batch, kv_heads, heads // kv_heads, n, head_dim)


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """(B, KV, G, n, X) @ (B, KV, X, m) -> (B, KV, G, n, m) as one (G * n) x X matmul per kv head,
    so b (keys or values) is read once per kv head and never expanded or copied per group."""
    batch, kv_heads, group, n, inner = a.shape
    return (a.reshape(batch, kv_heads, group * n, inner) @ b).view(batch, kv_heads, group, n, b.shape[-1])


def ungroup(x: Tensor) -> Tensor:
    """(B, KV, G, ...) -> (B, KV * G, ...), the inverse of `group_queries` on the leading dims."""
    return x.flatten(1, 2)


def grouped_slopes(alibi_slopes: Tensor | None, kv_heads: int) -> Tensor | None:
    """(H,) -> (KV, G, 1, 1) so it broadcasts over grouped scores (B, KV, G, nq, nk)."""
    if alibi_slopes is None:
        return None
    return alibi_slopes.view(kv_heads, -1, 1, 1)


def query_key_positions(nq: int, nk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """End-aligned positions: keys 0..nk-1, queries nk-nq..nk-1."""
    k_positions = torch.arange(nk, device=device)
    return k_positions[nk - nq :], k_positions


def entropy_from_logits(scores: Tensor, probs: Tensor) -> Tensor:
    """H = -sum p log p from masked scores and their softmax; exact zeros contribute 0."""
    log_probs = torch.log_softmax(scores, dim=-1)
    return -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
