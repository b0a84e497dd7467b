"""A GPT language model (in the spirit of nanoGPT's model.py) whose attention is any registered mechanism.

Token embedding tied to the output head, `num_layers` pre-LayerNorm blocks (attention from the
registry, then an MLP), a final LayerNorm, and GPT-2's initialisation with the standard deviations
taken from the layer widths (GPT._init_weights). The positional encoding comes from the position
registry: what it adds to the embeddings (sinusoidal) and what it hands to every attention kernel
(RoPE, ALiBi) are its own (`position.base.PositionEncoding`). A mechanism that needs learned
projections of the layer input besides q, k and v (gates, decays) declares them
(`AttentionKernel.layer_inputs`); the layer owns that module and passes its outputs to the kernel.

`model.short_conv=K` (0: off) adds a causal depthwise convolution of width K over time to the q, k
and v projections, followed by SiLU, before the mechanism (the short convolution of H3, Based,
Mamba and flash-linear-attention's DeltaNet / GLA layers): it lets a token's key and value mix in
its K - 1 predecessors, which a fixed-state mechanism needs to bind a key to the value next to it
(associative recall); softmax attention can learn that from positions. Decoding keeps the last
K - 1 projections per layer beside the kernel's cache (`LayerCache`).

Decoding: `caches = model.new_caches()` (one per layer, from the kernel), then
`model(idx, caches=caches)` with the prompt, then with one token at a time; each call sees
everything the caches have seen, at absolute positions (docs/decoding.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from transformer_comparison.attention import build_attention, registered_names
from transformer_comparison.attention.cache import DecodeCache
from transformer_comparison.config import Config, kernel_options_for, kv_heads_for, position_options_for
from transformer_comparison.position import build_position, position_names


@dataclass
class GPTConfig:
    vocab_size: int
    context_length: int = 64
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    num_kv_heads: int | None = None  # None: as many kv heads as query heads
    dropout: float = 0.0
    bias: bool = False
    attention_type: str = field(default_factory=lambda: registered_names()[0])
    attention_options: dict[str, Any] = field(default_factory=dict)
    position_embedding: str = field(default_factory=lambda: position_names()[0])
    position_options: dict[str, Any] = field(default_factory=dict)
    mlp_ratio: float = 4.0
    short_conv: int = 0  # width of the causal depthwise convolution over q, k, v; 0: none

    @property
    def mlp_width(self) -> int:
        return max(1, round(self.mlp_ratio * self.d_model))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


class ShortConv(nn.Module):
    """y_t = SiLU(sum_{i < K} w_i * x_{t - i}) per channel: causal, depthwise, width K, no bias.

    forward(x, tail) takes x (batch, n, channels) and the K - 1 inputs before it (None: the sequence
    starts here, zeros before it) and returns y and the new tail, the last K - 1 inputs seen.
    The weights keep torch's Conv1d initialisation, uniform in +-1/sqrt(K).
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(channels, channels, width, groups=channels, bias=False)

    def forward(self, x: Tensor, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        padded = torch.cat([tail, x], dim=1)
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        return F.silu(y), padded[:, padded.shape[1] - (self.width - 1) :]


class LayerCache(DecodeCache):
    """One layer's decoding memory with a short convolution: the kernel's cache and the last K - 1
    q, k, v projections the convolution reads."""

    def __init__(self, kernel_cache: DecodeCache) -> None:
        self.kernel_cache = kernel_cache
        self.conv_tail: Tensor | None = None

    @property
    def position(self) -> int:
        return self.kernel_cache.position

    def tensors(self) -> list[Tensor]:
        return self.kernel_cache.tensors() + ([] if self.conv_tail is None else [self.conv_tail])

    @property
    def allocated_bytes(self) -> int:
        return self.kernel_cache.allocated_bytes + (0 if self.conv_tail is None else self.conv_tail.nbytes)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (config.num_heads + 2 * config.kv_heads) * config.head_dim, bias=config.bias)
        qkv_width = (config.num_heads + 2 * config.kv_heads) * config.head_dim
        self.short_conv = ShortConv(qkv_width, config.short_conv) if config.short_conv else None
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.kernel = build_attention(config.attention_type, **config.attention_options)
        self.layer_inputs = self.kernel.layer_inputs(config.d_model, config.num_heads, config.head_dim)
        encoding = build_position(config.position_embedding, **config.position_options)
        positions = encoding.kernel_positions(config.num_heads, config.context_length)
        self.rope = positions.rope
        self.register_buffer("alibi_slopes", positions.alibi_slopes, persistent=False)

    def split_heads(self, x: Tensor, cache: DecodeCache | None = None) -> tuple[Tensor, Tensor, Tensor]:
        batch, n, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = self.qkv(x)
        if self.short_conv is not None:
            tail = cache.conv_tail if isinstance(cache, LayerCache) else None
            qkv, new_tail = self.short_conv(qkv, tail)
            if isinstance(cache, LayerCache):
                cache.conv_tail = new_tail.detach()
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def merge_heads(self, y: Tensor) -> Tensor:
        batch, _, n, _ = y.shape
        return self.dropout(self.proj(y.transpose(1, 2).reshape(batch, n, -1)))

    def forward(
        self, x: Tensor, return_entropy: bool = False, cache: DecodeCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self.split_heads(x, cache)
        extra = self.layer_inputs(x) if self.layer_inputs is not None else {}
        if cache is not None:
            kernel_cache = cache.kernel_cache if isinstance(cache, LayerCache) else cache
            y = self.kernel.decode(q, k, v, kernel_cache, alibi_slopes=self.alibi_slopes, rope=self.rope, **extra)
            return self.merge_heads(y), None
        result = self.kernel(
            q, k, v, causal=True, alibi_slopes=self.alibi_slopes, rope=self.rope, return_entropy=return_entropy, **extra
        )
        y, entropy = result if return_entropy else (result, None)
        return self.merge_heads(y), entropy


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_width, bias=config.bias)
        self.proj = nn.Linear(config.mlp_width, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, return_entropy: bool = False, cache: DecodeCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        attended, entropy = self.attn(self.ln_1(x), return_entropy, cache)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), entropy


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_encoding = build_position(config.position_embedding, **config.position_options)
        table = self.position_encoding.embeddings(0, config.context_length, config.d_model)
        self.register_buffer("position_table", table, persistent=False)  # None: the encoding adds nothing
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # weight tying
        self.apply(self._init_weights)
        nn.init.normal_(self.token_embedding.weight, mean=0.0, std=config.d_model**-0.5)  # the tied head was visited as a Linear
        for name, param in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * layers)
            if name.endswith("proj.weight"):
                param.data.div_(math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear layers: normal with std 1/sqrt(fan_in), which keeps activations at unit scale
        (LeCun); GPT-2's fixed 0.02 was tuned for d_model = 768 and starves small models. The
        residual projections are further divided by sqrt(2 * layers) and biases start at zero (GPT-2).
        The tied embedding has std d_model^-1/2 (Vaswani et al.), so the output head starts with
        logits of std 1. Measured on configs/nanogpt_cpu.yaml with dot_product (docs/results.md):
        rope 1.666 and alibi 1.736, means of 6 seeds, against rope 1.777 with GPT-2's 0.02."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 N for the weights (Kaplan et al. 2020; N without the embedding)
        plus 3 x the attention operation's forward FLOPs per token from the mechanism's own FLOP model
        (`AttentionKernel.flops`, causal, over a full training window), forward and backward."""
        c = self.config
        non_embedding = self.num_parameters() - self.token_embedding.weight.numel()
        kernel = self.blocks[0].attn.kernel
        window = kernel.flops(batch=1, heads=c.num_heads, nq=c.context_length, nk=c.context_length,
                              head_dim=c.head_dim, causal=True)
        return round(6 * non_embedding + 3 * c.num_layers * window / c.context_length)

    def position_rows(self, n: int, start: int = 0) -> Tensor:
        """Rows start .. start + n - 1 of the encoding's additive embeddings (the cached table within
        the training context, computed afresh beyond it)."""
        if start + n <= self.position_table.shape[0]:
            return self.position_table[start : start + n]
        table = self.position_encoding.embeddings(start, n, self.config.d_model)
        return table.to(self.position_table.device)

    def new_caches(self) -> list[DecodeCache]:
        """Empty decoding caches, one per layer, each of the kind its attention mechanism keeps."""
        caches = [block.attn.kernel.new_cache() for block in self.blocks]
        return [LayerCache(cache) for cache in caches] if self.config.short_conv else caches

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, return_entropy: bool = False,
        caches: list[DecodeCache] | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Return (logits, loss or None, entropy (layers, batch, heads, n) or None).

        caches (from `new_caches()`): idx continues the sequence those caches have seen; its tokens sit
        at absolute positions caches[0].position onwards, and the caches take them in. No entropy then.
        """
        start = 0
        if caches is not None:
            if len(caches) != len(self.blocks):
                raise ValueError(f"caches: expected one per layer ({len(self.blocks)}), got {len(caches)}")
            if return_entropy:
                raise ValueError("return_entropy is not available when decoding from caches")
            start = caches[0].position
        x = self.token_embedding(idx)
        if self.position_table is not None:
            x = x + self.position_rows(idx.shape[1], start)
        x = self.dropout(x)
        entropies = []
        for i, block in enumerate(self.blocks):
            x, entropy = block(x, return_entropy, None if caches is None else caches[i])
            entropies.append(entropy)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if not return_entropy or any(entropy is None for entropy in entropies):
            return logits, loss, None  # a mechanism without an attention distribution has no entropy
        return logits, loss, torch.stack(entropies)


def build_model(cfg: Config, vocab_size: int) -> GPT:
    """The GPT a validated run config describes, with `vocab_size` tokens."""
    return GPT(
        GPTConfig(
            vocab_size=vocab_size,
            context_length=cfg.model.context_length,
            d_model=cfg.model.d_model,
            num_heads=cfg.model.num_heads,
            num_layers=cfg.model.num_layers,
            num_kv_heads=kv_heads_for(cfg),
            dropout=cfg.model.dropout,
            bias=cfg.model.bias,
            attention_type=cfg.attention.type,
            attention_options=kernel_options_for(cfg),
            position_embedding=cfg.position.type,
            position_options=position_options_for(cfg),
            mlp_ratio=cfg.model.mlp_ratio,
            short_conv=cfg.model.short_conv,
        )
    )
