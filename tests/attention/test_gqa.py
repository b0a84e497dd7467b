"""gqa: dot-product attention over fewer kv heads, against the reference, without repeated K/V copies."""

from __future__ import annotations

import pytest
import torch

from tests.attention.conftest import make_qkv
from tests.attention.checks import POSITIONS, TIGHT, assert_matches_reference, assert_no_repeated_kv
from transformer_comparison.attention import build_attention
from transformer_comparison.position import Rotary, alibi_slopes


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_reference(causal, n, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=2 * n + kv_heads)
    assert_matches_reference("gqa", build_attention("gqa"), q, k, v, causal=causal, position=position)


@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_decoding_gives_the_last_rows_of_the_full_reference(kv_heads, nq):
    q, k, v = make_qkv(1, 4, kv_heads, 11, seed=3)
    assert_matches_reference("gqa", build_attention("gqa"), q, k, v, position="alibi+rope", last=nq)


def test_query_head_h_reads_kv_head_h_over_group_size():
    q, k, v = make_qkv(1, 6, 3, 7, seed=4)
    grouped = build_attention("gqa")(q, k, v)
    repeated = build_attention("dot_product")(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(grouped, repeated, **TIGHT)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_equals_dot_product_when_every_query_head_has_its_kv_head(causal):
    q, k, v = make_qkv(2, 4, 4, 9, seed=6)
    options = {"alibi_slopes": alibi_slopes(4, dtype=q.dtype), "rope": Rotary(), "return_entropy": True}
    got = build_attention("gqa")(q, k, v, causal=causal, **options)
    expected = build_attention("dot_product")(q, k, v, causal=causal, **options)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mechanism", ["gqa", "dot_product"])
def test_kv_heads_are_broadcast_not_copied(mechanism):
    assert_no_repeated_kv(build_attention(mechanism))
