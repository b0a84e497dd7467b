"""flash: exact softmax attention block by block, checked against the dense reference (float64)."""

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
from transformer_comparison.attention import flash as flash_module
from transformer_comparison.position import Rotary, alibi_slopes

assert_matches_reference = partial(checks.assert_matches_reference, "flash")  # output, entropy and q/k/v gradients


@pytest.mark.parametrize("n", [1, 7, 13])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True], ids=["no_rope", "rope"])
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_reference(causal, alibi, rope, kv_heads, n, slopes4):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + kv_heads)
    attn = build_attention("flash", block_size=4 if n % 2 else 5)
    assert_matches_reference(
        attn, q, k, v, causal=causal, slopes=slopes4 if alibi else None, rope_base=10000.0 if rope else None
    )


@pytest.mark.parametrize("nq", [1, 3, 8])  # query offsets 10, 8, 3: two are not multiples of the block size
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_queries_shorter_than_keys_are_end_aligned(causal, alibi, nq, slopes4):
    q = make_qkv(1, 4, 2, nq, seed=1)[0]
    _, k, v = make_qkv(1, 4, 2, 11, seed=2)
    attn = build_attention("flash", block_size=3)
    assert_matches_reference(attn, q, k, v, causal=causal, slopes=slopes4 if alibi else None, rope_base=10000.0)


@pytest.mark.parametrize(("nq", "nk", "block"), [(8, 8, 3), (5, 11, 3), (4, 11, 4), (16, 16, 4)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_key_blocks_are_one_partition_that_masks_every_future_key(nq, nk, block, causal):
    """The backward pass sums dK and dV per key block, so every query block's key blocks must start on
    the same multiples of the block size; a causal block must be masked wherever it holds a future key."""
    q = torch.zeros(1, 1, nq, 2)
    tiling = flash_module._Tiling.build(q, torch.zeros(1, 1, nk, 2), None, causal, block)
    for q_start, q_end in tiling.query_blocks(nq):
        blocks = tiling.key_blocks(q_start, q_end, nk)
        assert [start for start, _, _ in blocks] == list(range(0, blocks[-1][1], block))
        assert all(end - start <= block for start, end, _ in blocks)
        first, last = nk - nq + q_start, nk - nq + q_end
        assert blocks[-1][1] == (last if causal else nk)
        for start, end, masked in blocks:
            holds_future_key = causal and end - 1 > first
            assert masked or not holds_future_key


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 24),
    block_size=st.integers(1, 30),
    kv_heads=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    alibi=st.booleans(),
)
def test_equals_dot_product_for_any_block_size(n, block_size, kv_heads, causal, alibi):
    q, k, v = make_qkv(1, 4, kv_heads, n, seed=block_size)
    slopes = alibi_slopes(4, dtype=torch.float64) if alibi else None
    flash, dense = build_attention("flash", block_size=block_size), build_attention("dot_product")
    out, entropy = flash(q, k, v, causal=causal, alibi_slopes=slopes, return_entropy=True)
    ref_out, ref_entropy = dense(q, k, v, causal=causal, alibi_slopes=slopes, return_entropy=True)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(entropy, ref_entropy, **TIGHT)


@pytest.mark.parametrize(
    ("nq", "alibi", "causal"),
    [(9, False, True), (9, False, False), (9, True, True), (1, True, True), (1, False, False), (4, False, True)],
)
def test_sdpa_fast_path_matches_reference(nq, alibi, causal, slopes4):
    """use_sdpa takes torch's fused kernel where exact, the block-wise path elsewhere: same results."""
    q = make_qkv(1, 4, 2, nq, seed=3)[0]
    _, k, v = make_qkv(1, 4, 2, 9, seed=4)
    attn = build_attention("flash", block_size=4, use_sdpa=True)
    assert_matches_reference(attn, q, k, v, causal=causal, slopes=slopes4 if alibi else None, rope_base=10000.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_alibi_where_far_tiles_underflow_matches_reference(dtype):
    """Slopes up to 8 drive far tiles' probabilities below the smallest normal number (flushed to 0)."""
    q, k, v = make_qkv(1, 4, 2, 70)
    slopes = torch.tensor([8.0, 1.0, 0.25, 1e-3], dtype=torch.float64)
    if dtype == torch.float64:
        assert_matches_reference(build_attention("flash", block_size=8), q, k, v, causal=False, slopes=slopes)
        return
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    attn = build_attention("flash", block_size=8)
    out, entropy = attn(q32, k32, v32, causal=False, alibi_slopes=slopes.float(), return_entropy=True)
    ref_out, ref_entropy = reference_attention("flash", q, k, v, causal=False, alibi_slopes=slopes)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.float(), rtol=1e-4, atol=1e-5)


def _keys_with_one_orthogonal_giant(n: int, dtype: torch.dtype):
    """q, k, v whose queries are orthogonal to key 0, of norm 1000: no score uses that norm, but the
    bound |q_i| max_j |k_j| does, so every shifted probability underflows (2^-1000 and below)."""
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, n, head_dim=4, seed=5))
    q[..., 0] = 0.0
    k[:, :, 0] = torch.tensor([1000.0, 0.0, 0.0, 0.0], dtype=k.dtype)
    return (t.to(dtype).requires_grad_() for t in (q, k, v))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_rows_whose_score_bound_underflows_are_recomputed_with_the_running_max(causal):
    """The forward pass shifts each row by an upper bound of its scores; where that bound is so loose
    that a row's sum underflows (here to 0, which would give 0/0), the block takes the running max."""
    q, k, v = _keys_with_one_orthogonal_giant(12, torch.float64)
    assert_matches_reference(build_attention("flash", block_size=4), q, k, v, causal=causal, slopes=None)
    q32, k32, v32 = _keys_with_one_orthogonal_giant(12, torch.float32)
    out, entropy = build_attention("flash", block_size=4)(q32, k32, v32, causal=causal, return_entropy=True)
    ref_out, ref_entropy = reference_attention("flash", q, k, v, causal=causal)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.float(), rtol=1e-4, atol=1e-5)


def test_compiles_to_one_graph_that_matches_the_reference():
    """Under torch.compile (training.compile) the forward pass takes the running max: a graph cannot
    branch on whether a row's sum underflowed. fullgraph=True fails on any graph break."""
    q, k, v = make_qkv(1, 4, 2, 20, seed=6)
    attn = build_attention("flash", block_size=8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *qkv: attn(*qkv, causal=True, return_entropy=True), backend="eager", fullgraph=True)
    out, entropy = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_out, ref_entropy = reference_attention("flash", q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(entropy, ref_entropy, **TIGHT)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TIGHT)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_backward_saves_no_n_by_n_tensor(causal):
    n = 96
    q, k, v = make_qkv(1, 2, 1, n, head_dim=4)
    slopes = alibi_slopes(2, dtype=torch.float64)
    call = {"causal": causal, "alibi_slopes": slopes, "rope": Rotary()}
    flash_sizes = checks.saved_tensor_sizes(lambda: build_attention("flash", block_size=16)(q, k, v, **call))
    dense_sizes = checks.saved_tensor_sizes(lambda: build_attention("dot_product")(q, k, v, **call))
    assert max(dense_sizes) >= n * n  # the probe sees the score matrix where there is one
    assert max(flash_sizes) <= q.numel()


def test_float32_default_block_size_matches_reference():
    q, k, v = make_qkv(1, 2, 2, 300, head_dim=16)
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    out, entropy = build_attention("flash")(q32, k32, v32, causal=True, return_entropy=True)
    ref_out, ref_entropy = reference_attention("flash", q, k, v, causal=True)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bfloat16_inputs_give_finite_outputs_and_gradients(causal):
    checks.assert_bfloat16_gives_finite_outputs_and_gradients(build_attention("flash", block_size=8), causal)


def test_entropy_needs_no_gradient():
    checks.assert_entropy_needs_no_gradient(build_attention("flash", block_size=4))


def test_options_and_defaults():
    assert kernel_options("flash") == {"block_size": 256, "use_sdpa": False}
    assert build_attention("flash", block_size=64).block_size == 64


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True, "128"])
def test_bad_block_size_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        build_attention("flash", block_size=block_size)


def test_bad_use_sdpa_raises():
    with pytest.raises(ValueError, match="use_sdpa"):
        build_attention("flash", use_sdpa="yes")
