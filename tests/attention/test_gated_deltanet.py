"""gated_deltanet: the chunk-wise gated delta rule against the naive token-by-token recurrence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.attention import recurrent_reference as ref
from tests.attention.checks import POSITIONS, TIGHT
from tests.attention.conftest import make_qkv
from transformer_comparison.attention.registry import build_attention, kernel_class, kernel_options
from transformer_comparison.position import alibi_slopes

NAME = "gated_deltanet"


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("n", [1, 13, 37])
def test_matches_the_naive_recurrence(n, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + kv_heads)
    extras = ref.random_extras(NAME, 2, 4, n, 8, seed=n)
    ref.assert_matches_naive(NAME, build_attention(NAME, chunk_size=5), q, k, v, extras, position=position)


@pytest.mark.parametrize("chunk_size", [20, 64])
def test_chunks_of_several_inverse_blocks_match_the_naive_recurrence(chunk_size):
    q, k, v = make_qkv(1, 4, 2, 70, seed=chunk_size)
    extras = ref.random_extras(NAME, 1, 4, 70, 8, seed=chunk_size, strength=8.0)
    attn = build_attention(NAME, chunk_size=chunk_size, output_norm=False)
    ref.assert_matches_naive(NAME, attn, q, k, v, extras, position="alibi+rope")


@pytest.mark.parametrize("nq", [1, 3, 8])
def test_queries_shorter_than_keys_are_end_aligned(nq):
    q, k, v = make_qkv(1, 4, 2, 11, seed=1)
    extras = ref.random_extras(NAME, 1, 4, 11, 8, seed=1)
    ref.assert_matches_naive(NAME, build_attention(NAME, chunk_size=3), q, k, v, extras, position="alibi+rope", last=nq)


def test_a_constant_gate_is_deltanet_with_alibi():
    """ALiBi's slopes as the gate, log alpha = -m_h, give deltanet + ALiBi (two routes to one recurrence)."""
    q, k, v = make_qkv(1, 4, 2, 23, seed=6)
    beta = ref.random_extras("deltanet", 1, 4, 23, 8)["beta"]
    slopes = alibi_slopes(4, dtype=torch.float64)
    gated = build_attention(NAME, chunk_size=8)(q, k, v, beta=beta, log_decay=(-slopes)[:, None].expand(1, 4, 23))
    torch.testing.assert_close(gated, build_attention("deltanet", chunk_size=5)(q, k, v, beta=beta, alibi_slopes=slopes), **TIGHT)


def naive_inputs(x, module):
    """The paper's alpha = exp(-exp(A_log) softplus(x W_alpha + dt_bias)) and beta = sigmoid(x W_beta), (B, H, n)."""
    step = torch.log1p(torch.exp(x @ module.decay_proj.weight.T + module.dt_bias))
    alpha = torch.exp(-torch.exp(module.A_log) * step)
    beta = 1 / (1 + torch.exp(-(x @ module.strength.proj.weight.T)))
    return alpha.transpose(1, 2), beta.transpose(1, 2)


def test_layer_inputs_and_their_gradients_match_the_paper():
    n, heads = 11, 4
    attn = build_attention(NAME, chunk_size=4)
    module = attn.layer_inputs(20, heads, 8).double()
    x = torch.randn(2, n, 20, dtype=torch.float64, requires_grad=True)
    q, k, v = make_qkv(2, heads, 2, n, seed=4)
    out = attn(q, k, v, **module(x))
    alpha, beta = naive_inputs(x, module)
    expected, _ = ref.naive_recurrence(NAME, q, k, v, decay=alpha, beta=beta)
    torch.testing.assert_close(out, expected, **TIGHT)
    inputs = (x, q, k, v, *module.parameters())
    assert len(list(module.parameters())) == 4  # W_alpha, W_beta, A_log, dt_bias
    for grad, expected_grad in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)):
        torch.testing.assert_close(grad, expected_grad, **TIGHT)


def test_the_gate_parameters_start_in_mamba2s_ranges():
    module = build_attention(NAME).layer_inputs(64, 256, 16)
    rate, step = module.A_log.detach().exp(), F.softplus(module.dt_bias.detach())
    assert float(rate.min()) > 0 and float(rate.max()) <= 16.0 and float(rate.std()) > 3
    assert float(step.min()) >= 1e-3 * (1 - 1e-4) and float(step.max()) <= 1e-1 * (1 + 1e-4)
    assert abs(float(step.log().mean()) - math.log(1e-2)) < 0.4  # log-uniform between 1e-3 and 1e-1
    before = module.A_log.detach().clone()
    module.reset_parameters()
    assert not torch.equal(before, module.A_log)


@pytest.mark.parametrize("position", ["none", "alibi+rope"])
@pytest.mark.parametrize("splits", [(5, 1, 1, 3, 1, 1), (1, 1, 9, 2), (12,)])
def test_cached_decoding_equals_the_full_forward(splits, position):
    ref.assert_decoding_matches_full(NAME, build_attention(NAME, chunk_size=4), splits, position=position)


def test_chunk_size_does_not_change_the_result():
    ref.assert_chunk_size_invariant(NAME, (1, 3, 16, 20, 64))


def test_long_strongly_decaying_sequence_is_finite_and_exact():
    """n = 8192 in float32: gates of e^-30 per step on one head, e^-1e-3 on the other; strong writes."""
    g = torch.Generator().manual_seed(0)
    log_decay = torch.stack((torch.full((8192,), -30.0), torch.full((8192,), -1e-3)))[None]
    beta = torch.rand(1, 2, 8192, generator=g) ** 0.1
    ref.assert_long_sequence_matches_naive(NAME, build_attention(NAME, output_norm=False),
                                           {"log_decay": log_decay, "beta": beta})


def test_bfloat16_inputs_give_finite_outputs_and_gradients():
    ref.assert_bfloat16_finite(build_attention(NAME, chunk_size=8), NAME)


def test_memory_is_linear_in_the_sequence():
    ref.assert_saves_linear_memory(build_attention(NAME, chunk_size=16), NAME)


def test_empty_inputs_give_empty_outputs():
    ref.assert_empty_inputs_give_empty_outputs(build_attention(NAME), NAME)


def test_agrees_with_flash_linear_attention_naive_gated_delta_rule():
    """fla's recurrence and its chunk-wise torch form (q, k normalised beforehand; fla's layout is (B, T, H, d))."""
    fla = ref.load_fla_naive("gated_delta_rule/naive.py")
    q, k, v = (t.detach().float() for t in make_qkv(2, 4, 4, 50, head_dim=16, seed=4))
    beta, log_decay = torch.rand(2, 4, 50), -F.softplus(torch.randn(2, 4, 50)) / 2
    ours = build_attention(NAME, chunk_size=16, output_norm=False)(q, k, v, beta=beta, log_decay=log_decay)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    layout = [t.transpose(1, 2) for t in (qn, kn, v, beta, log_decay)]
    recurrent, _ = fla.naive_recurrent_gated_delta_rule(*layout)
    q_, k_, v_, beta_, g_ = layout
    chunked, _ = fla.naive_chunk_gated_delta_rule(q_, k_, v_, g_, beta_, chunk_size=16)
    torch.testing.assert_close(ours, recurrent.transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, chunked.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_kernel_facts():
    cls = kernel_class(NAME)
    assert not cls.has_entropy and not cls.supports_non_causal and cls.refused_positions == {}
    assert kernel_options(NAME) == {"chunk_size": 64, "output_norm": True}


def test_flops_grow_linearly_in_the_sequence():
    attn = build_attention(NAME)
    f = [attn.flops(batch=1, heads=8, nq=n, nk=n, head_dim=64, causal=True) for n in (1024, 4096)]
    assert f[0] > 0 and f[1] == pytest.approx(4 * f[0], rel=0.01)


def test_missing_wrongly_shaped_or_growing_gates_are_refused():
    q, k, v = make_qkv(1, 2, 2, 4)
    attn = build_attention(NAME)
    ones = torch.ones(1, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="missing: log_decay"):
        attn(q, k, v, beta=ones)
    with pytest.raises(ValueError, match=r"log_decay must have shape \(1, 2, 4\)"):
        attn(q, k, v, beta=ones, log_decay=ones[..., None])
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        attn(q, k, v, beta=ones, log_decay=ones)


@pytest.mark.parametrize(("option", "bad", "message"), [
    ("chunk_size", 0, "chunk_size must be an integer >= 1"),
    ("output_norm", 1, "output_norm must be true or false"),
])
def test_bad_options_raise(option, bad, message):
    with pytest.raises(ValueError, match=option):
        build_attention(NAME, **{option: bad})
    with pytest.raises(ValueError, match=message):
        kernel_class(NAME)(**{option: bad})
