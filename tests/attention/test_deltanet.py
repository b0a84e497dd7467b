"""deltanet: the chunk-wise WY form of the delta rule against the naive token-by-token recurrence."""

from __future__ import annotations

import pytest
import torch

from tests.attention import recurrent_reference as ref
from tests.attention.checks import POSITIONS, TIGHT
from tests.attention.conftest import make_qkv
from transformer_comparison.attention.deltanet import _UnitLowerInverse, invert_unit_lower
from transformer_comparison.attention.registry import build_attention, kernel_class, kernel_options

NAME = "deltanet"


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("n", [1, 13, 37])
def test_matches_the_naive_recurrence(n, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + kv_heads)
    extras = ref.random_extras(NAME, 2, 4, n, 8, seed=n)
    ref.assert_matches_naive(NAME, build_attention(NAME, chunk_size=5), q, k, v, extras, position=position)


@pytest.mark.parametrize("chunk_size", [20, 64])
def test_chunks_of_several_inverse_blocks_match_the_naive_recurrence(chunk_size):
    """20 is padded to two blocks of 16 in the inverse, 64 is four."""
    q, k, v = make_qkv(1, 4, 2, 70, seed=chunk_size)
    extras = ref.random_extras(NAME, 1, 4, 70, 8, seed=chunk_size)
    attn = build_attention(NAME, chunk_size=chunk_size, output_norm=False)
    ref.assert_matches_naive(NAME, attn, q, k, v, extras, position="alibi+rope")


@pytest.mark.parametrize("nq", [1, 3, 8])
def test_queries_shorter_than_keys_are_end_aligned(nq):
    q, k, v = make_qkv(1, 4, 2, 11, seed=1)
    extras = ref.random_extras(NAME, 1, 4, 11, 8, seed=1)
    ref.assert_matches_naive(NAME, build_attention(NAME, chunk_size=3), q, k, v, extras, position="alibi+rope", last=nq)


@pytest.mark.parametrize("size", [1, 5, 16, 20, 64])
def test_the_blocked_inverse_is_the_inverse(size):
    g = torch.Generator().manual_seed(size)
    lower = torch.randn(3, 2, size, size, generator=g, dtype=torch.float64).tril(-1) / 4
    expected = torch.linalg.inv(torch.eye(size, dtype=torch.float64) + lower)
    torch.testing.assert_close(invert_unit_lower(lower), expected, **TIGHT)


def test_the_inverse_has_the_right_gradient():
    lower = (torch.randn(2, 7, 7, dtype=torch.float64) / 3).tril(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _UnitLowerInverse.apply(x.tril(-1)), (lower,))


def test_queries_and_keys_are_l2_normalised():
    """Scaling q and k per token changes nothing: the rule reads unit-norm q and k."""
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 9, seed=2))
    extras = {key: t.detach() for key, t in ref.random_extras(NAME, 1, 4, 9, 8).items()}
    attn = build_attention(NAME, chunk_size=4, output_norm=False)
    scales = torch.rand(1, 1, 9, 1, dtype=torch.float64) * 10 + 1
    torch.testing.assert_close(attn(q * scales, k * scales, v, **extras), attn(q, k, v, **extras), rtol=1e-5, atol=1e-6)


def test_layer_inputs_write_strength_and_its_gradients_match_the_paper():
    n, heads = 11, 4
    attn = build_attention(NAME, chunk_size=4)
    module = attn.layer_inputs(20, heads, 8).double()
    x = torch.randn(2, n, 20, dtype=torch.float64, requires_grad=True)
    q, k, v = make_qkv(2, heads, 2, n, seed=4)
    out = attn(q, k, v, **module(x))
    beta = 1 / (1 + torch.exp(-(x @ module.proj.weight.T))).transpose(1, 2)
    expected, _ = ref.naive_recurrence(NAME, q, k, v, beta=beta)
    torch.testing.assert_close(out, expected, **TIGHT)
    inputs = (x, q, k, v, *module.parameters())
    for grad, expected_grad in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)):
        torch.testing.assert_close(grad, expected_grad, **TIGHT)


@pytest.mark.parametrize("position", ["none", "alibi+rope"])
@pytest.mark.parametrize("splits", [(5, 1, 1, 3, 1, 1), (1, 1, 9, 2), (12,)])
def test_cached_decoding_equals_the_full_forward(splits, position):
    ref.assert_decoding_matches_full(NAME, build_attention(NAME, chunk_size=4), splits, position=position)


def test_chunk_size_does_not_change_the_result():
    ref.assert_chunk_size_invariant(NAME, (1, 3, 16, 20, 64))


def test_long_sequence_is_finite_and_exact():
    """n = 8192 in float32, strong writes (beta up to 1), an ALiBi decay of e^-30 per step on one head."""
    beta = torch.rand(1, 2, 8192, generator=torch.Generator().manual_seed(0)) ** 0.1
    ref.assert_long_sequence_matches_naive(NAME, build_attention(NAME, output_norm=False), {"beta": beta},
                                           slopes=torch.tensor([30.0, 0.0]))


def test_bfloat16_inputs_give_finite_outputs_and_gradients():
    ref.assert_bfloat16_finite(build_attention(NAME, chunk_size=8), NAME)


def test_memory_is_linear_in_the_sequence():
    ref.assert_saves_linear_memory(build_attention(NAME, chunk_size=16), NAME)


def test_empty_inputs_give_empty_outputs():
    ref.assert_empty_inputs_give_empty_outputs(build_attention(NAME), NAME)


def test_agrees_with_flash_linear_attention_naive_delta_rule():
    """fla's recurrence and its chunk-wise torch form (q, k normalised beforehand: fla's ops take them as given)."""
    fla = ref.load_fla_naive("delta_rule/naive.py")
    q, k, v = (t.detach().float() for t in make_qkv(2, 4, 4, 64, head_dim=16, seed=4))
    beta = torch.rand(2, 4, 64)
    ours = build_attention(NAME, chunk_size=16, output_norm=False)(q, k, v, beta=beta)
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    recurrent, _ = fla.delta_rule_recurrence(qn, kn, v, beta)
    chunked, _ = fla.delta_rule_chunkwise(qn, kn, v, beta, chunk_size=32)
    torch.testing.assert_close(ours, recurrent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, chunked, rtol=1e-4, atol=1e-5)


def test_kernel_facts():
    cls = kernel_class(NAME)
    assert not cls.has_entropy and not cls.supports_non_causal and cls.refused_positions == {}
    assert kernel_options(NAME) == {"chunk_size": 64, "output_norm": True}


def test_flops_grow_linearly_in_the_sequence():
    attn = build_attention(NAME)
    f = [attn.flops(batch=1, heads=8, nq=n, nk=n, head_dim=64, causal=True) for n in (1024, 4096)]
    assert f[0] > 0 and f[1] == pytest.approx(4 * f[0], rel=0.01)


def test_missing_or_wrongly_shaped_write_strengths_are_refused():
    q, k, v = make_qkv(1, 2, 2, 4)
    attn = build_attention(NAME)
    with pytest.raises(ValueError, match="missing: beta"):
        attn(q, k, v)
    with pytest.raises(ValueError, match=r"beta must have shape \(1, 2, 4\)"):
        attn(q, k, v, beta=torch.ones(1, 2, 4, 1, dtype=torch.float64))


@pytest.mark.parametrize(("option", "bad", "message"), [
    ("chunk_size", 0, "chunk_size must be an integer >= 1"),
    ("chunk_size", 2.5, "chunk_size must be an integer >= 1"),
    ("output_norm", "no", "output_norm must be true or false"),
])
def test_bad_options_raise(option, bad, message):
    with pytest.raises(ValueError, match=option):
        build_attention(NAME, **{option: bad})
    with pytest.raises(ValueError, match=message):
        kernel_class(NAME)(**{option: bad})
