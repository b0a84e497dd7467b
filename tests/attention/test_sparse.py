"""sparse: softmax over each query's top_k keys, in query chunks, against the reference's top-k mask."""

from __future__ import annotations

import pytest
import torch

from tests.attention.conftest import make_qkv
from tests.attention.checks import (
    POSITIONS,
    TIGHT,
    assert_matches_reference,
    assert_no_queries_give_empty_results,
    assert_no_repeated_kv,
    saved_bytes,
)
from transformer_comparison.attention import build_attention
from transformer_comparison.attention.sparse import select_top_k
from transformer_comparison.position import Rotary, alibi_slopes


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize(("top_k", "query_chunk"), [(1, 256), (4, 3), (4, 256), (50, 4)])
@pytest.mark.parametrize("n", [1, 7, 13])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_reference(causal, n, top_k, query_chunk, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + top_k + kv_heads)
    attn = build_attention("sparse", top_k=top_k, query_chunk=query_chunk)
    assert_matches_reference("sparse", attn, q, k, v, causal=causal, position=position, top_k=top_k)


@pytest.mark.parametrize("top_k", [1, 4, 20])
@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_decoding_gives_the_last_rows_of_the_full_reference(causal, nq, top_k):
    q, k, v = make_qkv(1, 4, 2, 11, seed=3)
    attn = build_attention("sparse", top_k=top_k, query_chunk=2)
    assert_matches_reference("sparse", attn, q, k, v, causal=causal, position="alibi+rope", last=nq, top_k=top_k)


@pytest.mark.parametrize("n", [1, 6, 11])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_equals_dot_product_when_top_k_covers_the_sequence(causal, n):
    q, k, v = make_qkv(2, 4, 2, n, seed=20 + n)
    options = {"alibi_slopes": alibi_slopes(4, dtype=q.dtype), "rope": Rotary(), "return_entropy": True}
    expected = build_attention("dot_product")(q, k, v, causal=causal, **options)
    for top_k in (n, n + 1, 1000):
        got = build_attention("sparse", top_k=top_k, query_chunk=4)(q, k, v, causal=causal, **options)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TIGHT)


def test_top_one_is_hard_attention_to_the_best_key():
    q, k, v = make_qkv(1, 2, 2, 9, seed=12)
    out, entropy = build_attention("sparse", top_k=1)(q, k, v, causal=False, return_entropy=True)
    best = (q @ k.transpose(-1, -2)).argmax(-1)
    torch.testing.assert_close(out, v.gather(2, best.unsqueeze(-1).expand_as(v)), rtol=0, atol=0)
    assert entropy.abs().max() == 0


def test_chunking_does_not_change_the_result():
    q, k, v = make_qkv(1, 4, 2, 17, seed=13)
    options = {"alibi_slopes": alibi_slopes(4, dtype=q.dtype), "rope": Rotary(), "return_entropy": True}
    whole = build_attention("sparse", top_k=5, query_chunk=17)(q, k, v, **options)
    for chunk in (1, 4, 16):
        for a, b in zip(build_attention("sparse", top_k=5, query_chunk=chunk)(q, k, v, **options), whole):
            torch.testing.assert_close(a, b, **TIGHT)


def test_memory_kept_for_backward_grows_linearly_with_length():
    attn = build_attention("sparse", top_k=8, query_chunk=128)
    small, large = (saved_bytes(attn, n) for n in (512, 2048))
    assert large / small < 5, f"saved {small} bytes at n=512 but {large} at n=2048: not linear"


def test_kv_heads_are_broadcast_not_copied():
    assert_no_repeated_kv(build_attention("sparse", top_k=4))


@pytest.mark.parametrize("nk", [0, 5])
def test_no_queries_give_empty_results(nk):
    assert_no_queries_give_empty_results(build_attention("sparse"), nk)


@pytest.mark.parametrize("ramp", [0.0, 0.5, -0.5])
def test_select_top_k_finds_what_topk_finds(ramp):
    """Nearest-first selection (fast on ALiBi's rising rows) keeps the same keys with the same scores."""
    scores = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)) + ramp * torch.arange(40.0)
    scores[1, :, 30:] = float("-inf")  # keys a causal chunk cannot see
    best, index = select_top_k(scores, 7)
    expected_best, expected_index = scores.topk(7, dim=-1)
    torch.testing.assert_close(best, expected_best)
    assert torch.equal(index.sort(-1).values, expected_index.sort(-1).values)
    torch.testing.assert_close(scores.gather(-1, index), best)
