"""Attention mechanisms behind one signature (see `base.py`), looked up by name.

    from transformer_comparison.attention import ATTENTION_TYPES, build_attention
    attn = build_attention("local", window=128)
    out = attn(q, k, v, causal=True, alibi_slopes=None)
"""

from transformer_comparison.attention import dot_product, flash, gqa, linear, local, sparse  # noqa: F401  (registers)
from transformer_comparison.attention.base import AttentionKernel
from transformer_comparison.attention.registry import build_attention, kernel_options, register_attention, registered_names

ATTENTION_TYPES: tuple[str, ...] = ("dot_product", "linear", "sparse", "local", "gqa", "flash")

__all__ = ["ATTENTION_TYPES", "AttentionKernel", "build_attention", "kernel_options", "register_attention"]
