"""dot_product against the dense reference (float64); the shared checks live in checks.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.attention.conftest import make_qkv
from tests.attention.checks import POSITIONS, assert_matches_reference
from transformer_comparison.attention import build_attention


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("n", [1, 6, 13])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_reference(causal, n, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + kv_heads)
    assert_matches_reference("dot_product", build_attention("dot_product"), q, k, v, causal=causal, position=position)


@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_decoding_gives_the_last_rows_of_the_full_reference(causal, nq):
    q, k, v = make_qkv(1, 4, 2, 11, seed=3)
    attn = build_attention("dot_product")
    assert_matches_reference("dot_product", attn, q, k, v, causal=causal, position="alibi+rope", last=nq)


def test_entropy_of_a_uniform_distribution_is_log_of_the_visible_count():
    q = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    k, v = torch.randn(1, 1, 5, 4, dtype=torch.float64), torch.randn(1, 1, 5, 4, dtype=torch.float64)
    _, entropy = build_attention("dot_product")(q, k, v, causal=True, return_entropy=True)
    torch.testing.assert_close(entropy[0, 0], torch.log(torch.arange(1, 6, dtype=torch.float64)))
    _, entropy = build_attention("dot_product")(q, k, v, causal=False, return_entropy=True)
    torch.testing.assert_close(entropy[0, 0], torch.full((5,), math.log(5), dtype=torch.float64))


def test_the_causal_bias_is_kept_for_training_shapes_only():
    from transformer_comparison.attention.bias import CACHED_BIAS_ELEMENTS, clear_bias_cache, end_aligned_causal_bias

    clear_bias_cache()
    cpu = torch.device("cpu")
    small = end_aligned_causal_bias(64, 64, cpu, torch.float32)
    assert end_aligned_causal_bias(64, 64, cpu, torch.float32) is small  # built once
    assert small[0, 1] == float("-inf") and small[1, 0] == 0 and small[1, 1] == 0
    side = int(CACHED_BIAS_ELEMENTS**0.5) + 1
    assert end_aligned_causal_bias(1, side * side, cpu, torch.float32) is not end_aligned_causal_bias(1, side * side, cpu, torch.float32)
    clear_bias_cache()
    assert end_aligned_causal_bias(64, 64, cpu, torch.float32) is not small
