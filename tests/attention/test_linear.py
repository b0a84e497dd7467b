"""linear: chunk-wise linear attention with phi = elu + 1, checked against the dense reference (float64)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.attention.conftest import make_qkv
from tests.attention import checks
from tests.attention.checks import TIGHT
from tests.attention.reference import reference_attention
from transformer_comparison.attention import build_attention, kernel_options
from transformer_comparison.position import Rotary, alibi_slopes

assert_matches_reference = partial(checks.assert_matches_reference, "linear")  # output, entropy and q/k/v gradients


@pytest.mark.parametrize("n", [1, 7, 13])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True], ids=["no_rope", "rope"])
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_reference(causal, alibi, rope, kv_heads, n, slopes4):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + kv_heads)
    attn = build_attention("linear", chunk_size=4 if n % 2 else 5)
    assert_matches_reference(
        attn, q, k, v, causal=causal, slopes=slopes4 if alibi else None, rope_base=10000.0 if rope else None
    )


@pytest.mark.parametrize("nq", [1, 3, 8])
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_queries_shorter_than_keys_are_end_aligned(causal, alibi, nq, slopes4):
    q = make_qkv(1, 4, 2, nq, seed=1)[0]
    _, k, v = make_qkv(1, 4, 2, 11, seed=2)
    attn = build_attention("linear", chunk_size=3)
    assert_matches_reference(attn, q, k, v, causal=causal, slopes=slopes4 if alibi else None, rope_base=10000.0)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 40),
    chunk_size=st.integers(1, 45),
    kv_heads=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    alibi=st.booleans(),
    rope=st.booleans(),
)
def test_any_chunk_size_matches_reference(n, chunk_size, kv_heads, causal, alibi, rope):
    q, k, v = make_qkv(1, 4, kv_heads, n, seed=chunk_size)
    slopes = alibi_slopes(4, dtype=torch.float64) if alibi else None
    attn = build_attention("linear", chunk_size=chunk_size)
    rope_base = 10000.0 if rope else None
    out = attn(q, k, v, causal=causal, alibi_slopes=slopes, rope=Rotary() if rope else None)
    ref_out, _ = reference_attention("linear", q, k, v, causal=causal, alibi_slopes=slopes, rope_base=rope_base)
    torch.testing.assert_close(out, ref_out, **TIGHT)


def test_strong_alibi_decay_over_many_chunks_matches_reference():
    """Slopes up to 4 make exp(-m C) underflow-small across chunks; the scan must stay exact."""
    q, k, v = make_qkv(1, 4, 4, 70)
    slopes = torch.tensor([4.0, 1.0, 0.25, 1e-3], dtype=torch.float64)
    assert_matches_reference(build_attention("linear", chunk_size=4), q, k, v, causal=True, slopes=slopes)


@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
def test_more_chunks_than_one_prefix_block_matches_reference(alibi, slopes4):
    """150 chunks of 1: the prefix over chunks carries block totals across blocks of 64 chunks."""
    q, k, v = make_qkv(1, 4, 2, 150)
    attn = build_attention("linear", chunk_size=1)
    assert_matches_reference(attn, q, k, v, causal=True, slopes=slopes4 if alibi else None, rope_base=10000.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_saves_no_n_by_n_tensor(causal):
    n = 128
    q, k, v = make_qkv(1, 2, 1, n, head_dim=4)
    call = {"causal": causal, "alibi_slopes": alibi_slopes(2, dtype=torch.float64), "rope": Rotary()}
    sizes = checks.saved_tensor_sizes(lambda: build_attention("linear", chunk_size=8)(q, k, v, **call))
    assert max(sizes) < n * n


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bfloat16_inputs_give_finite_outputs_and_gradients(causal):
    checks.assert_bfloat16_gives_finite_outputs_and_gradients(build_attention("linear", chunk_size=8), causal)


def test_underflowing_features_stay_finite():
    """phi(q) = elu(q) + 1 underflows for very negative q: the eps floor keeps 0 / 0 away."""
    q, k, v = make_qkv(1, 2, 2, 9, dtype=torch.float32)
    q = (q.detach() - 200.0).requires_grad_()
    out, entropy = build_attention("linear", chunk_size=4)(q, k, v, return_entropy=True)
    assert torch.isfinite(out).all() and torch.isfinite(entropy).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_entropy_needs_no_gradient():
    checks.assert_entropy_needs_no_gradient(build_attention("linear", chunk_size=4))


def test_options_and_defaults():
    assert kernel_options("linear") == {"chunk_size": 64, "feature_map": "elu", "eps": 1e-6}


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, False])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        build_attention("linear", chunk_size=chunk_size)


def test_bad_feature_map_raises_naming_the_valid_ones():
    with pytest.raises(ValueError, match="'relu'.*elu"):
        build_attention("linear", feature_map="relu")


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), "small"])
def test_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps"):
        build_attention("linear", eps=eps)
