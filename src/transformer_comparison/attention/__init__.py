"""Attention mechanisms behind one signature (see `base.py`), looked up by name.

    from transformer_comparison.attention import build_attention, registered_names
    attn = build_attention("local", window=128)
    out = attn(q, k, v, causal=True, alibi_slopes=None)

Every module of this package registers itself (`registry.discover`); nothing lists them here.
"""

from transformer_comparison.attention.base import AttentionKernel
from transformer_comparison.attention.registry import (
    build_attention,
    discover,
    kernel_class,
    kernel_options,
    options_model,
    register_attention,
    registered_names,
)

discover()
ATTENTION_TYPES: tuple[str, ...] = registered_names()  # at import time; registered_names() sees later additions

__all__ = [
    "ATTENTION_TYPES", "AttentionKernel", "build_attention", "kernel_class", "kernel_options", "options_model",
    "register_attention", "registered_names",
]
