"""retention: chunk-wise RetNet retention against the naive token-by-token recurrence (float64)."""

from __future__ import annotations

import pytest
import torch

import transformer_comparison.attention.retention  # noqa: F401  (registers until attention/__init__ discovers modules)
from tests.attention import recurrent_reference as ref
from tests.attention.checks import POSITIONS, TIGHT
from tests.attention.conftest import make_qkv
from transformer_comparison.attention.registry import build_attention, kernel_class, kernel_options
from transformer_comparison.position import Rotary, alibi_slopes

NAME = "retention"


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("n", [1, 13, 37])
def test_matches_the_naive_recurrence(n, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + kv_heads)
    attn = build_attention(NAME, chunk_size=5)
    ref.assert_matches_naive(NAME, attn, q, k, v, {}, position=position)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_without_output_norm_matches_the_naive_recurrence(chunk_size):
    q, k, v = make_qkv(1, 4, 2, 30, seed=2)
    attn = build_attention(NAME, chunk_size=chunk_size, output_norm=False)
    ref.assert_matches_naive(NAME, attn, q, k, v, {}, position="alibi+rope")


@pytest.mark.parametrize("nq", [1, 3, 8])
def test_queries_shorter_than_keys_are_end_aligned(nq):
    q, k, v = make_qkv(1, 4, 2, 11, seed=1)
    ref.assert_matches_naive(NAME, build_attention(NAME, chunk_size=3), q, k, v, {}, position="alibi+rope", last=nq)


def test_the_decays_follow_the_paper_schedule():
    """gamma_h = 1 - 2^(-5 - h): with unit q.k and v, the output of head h after t tokens is sum gamma^j."""
    n, heads = 40, 6
    q = torch.full((1, heads, n, 4), 1.0, dtype=torch.float64)
    k = torch.zeros(1, heads, n, 4, dtype=torch.float64)
    k[..., 0] = 2.0  # q . k / sqrt(4) = 1
    v = torch.ones(1, heads, n, 4, dtype=torch.float64)
    out = build_attention(NAME, chunk_size=7, output_norm=False)(q, k, v)[0, :, :, 0]
    gammas = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(heads)], dtype=torch.float64)
    expected = (1 - gammas[:, None] ** torch.arange(1, n + 1)) / (1 - gammas[:, None])
    torch.testing.assert_close(out, expected, **TIGHT)


@pytest.mark.parametrize("position", ["none", "alibi+rope"])
@pytest.mark.parametrize("splits", [(5, 1, 1, 3, 1, 1), (1, 1, 9, 2), (12,)])
def test_cached_decoding_equals_the_full_forward(splits, position):
    ref.assert_decoding_matches_full(NAME, build_attention(NAME, chunk_size=4), splits, position=position)


def test_chunk_size_does_not_change_the_result():
    ref.assert_chunk_size_invariant(NAME, (1, 3, 16, 45, 64))


def test_long_strongly_decaying_sequence_is_finite_and_exact():
    """n = 8192 in float32, ALiBi slopes up to 30 per step next to RetNet's slowest head."""
    slopes = torch.tensor([30.0, 0.0])
    ref.assert_long_sequence_matches_naive(NAME, build_attention(NAME, output_norm=False), {}, slopes=slopes)


def test_bfloat16_inputs_give_finite_outputs_and_gradients():
    ref.assert_bfloat16_finite(build_attention(NAME, chunk_size=8), NAME)


def test_memory_is_linear_in_the_sequence():
    ref.assert_saves_linear_memory(build_attention(NAME, chunk_size=16), NAME)


def test_empty_inputs_give_empty_outputs():
    ref.assert_empty_inputs_give_empty_outputs(build_attention(NAME), NAME)


def test_agrees_with_flash_linear_attention_naive_retention():
    fla = ref.load_fla_naive("retention/naive.py")
    q, k, v = (t.detach().float() for t in make_qkv(2, 4, 4, 50, head_dim=16, seed=4))
    ours = build_attention(NAME, chunk_size=16, output_norm=False)(q, k, v)
    torch.testing.assert_close(ours, fla.naive_retention(q, k, v), rtol=1e-4, atol=1e-4)


def test_kernel_facts():
    cls = kernel_class(NAME)
    assert not cls.has_entropy and not cls.supports_non_causal and cls.refused_positions == {}
    assert kernel_options(NAME) == {"chunk_size": 64, "output_norm": True}
    assert build_attention(NAME).layer_inputs(32, 4, 8) is None


def test_flops_grow_linearly_in_the_sequence():
    attn = build_attention(NAME)
    f = [attn.flops(batch=1, heads=8, nq=n, nk=n, head_dim=64, causal=True) for n in (1024, 4096)]
    assert f[0] > 0 and f[1] == pytest.approx(4 * f[0], rel=0.01)


def test_non_causal_is_refused():
    q, k, v = make_qkv(1, 2, 2, 4)
    with pytest.raises(ValueError, match="causal only"):
        build_attention(NAME)(q, k, v, causal=False)


def test_extras_it_does_not_take_are_refused():
    q, k, v = make_qkv(1, 2, 2, 4)
    with pytest.raises(ValueError, match="unknown: beta"):
        build_attention(NAME)(q, k, v, beta=torch.ones(1, 2, 4))


def test_a_cache_of_another_shape_is_refused():
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 3))
    attn = build_attention(NAME)
    cache = attn.new_cache()
    attn.decode(q, k, v, cache)
    with pytest.raises(ValueError, match="do not match the state"):
        attn.decode(q[:, :1], k[:, :1], v[:, :1], cache, rope=Rotary(), alibi_slopes=alibi_slopes(1))


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, False])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        build_attention(NAME, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        kernel_class(NAME)(chunk_size=chunk_size)


def test_bad_output_norm_raises():
    with pytest.raises(ValueError, match="output_norm"):
        build_attention(NAME, output_norm="yes")
    with pytest.raises(ValueError, match="output_norm must be true or false"):
        kernel_class(NAME)(output_norm="yes")
