"""The conformance suite: every registered mechanism, as `build_attention` and the model use it.

Parametrised over `registered_names()`, so a new mechanism's file is tested here as soon as it
registers: options and their validation, input checks, causality, gradients, low precision, entropy,
its FLOP model, cached decoding against the full call, and (for mechanisms listed in
`tests.attention.reference.REFERENCES` or with a naive reference of their own) exactness.
Mechanisms that own learned projections of the layer input get them from `layer_inputs`.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.attention.checks import TIGHT
from tests.attention.checks import kernel_extras as extras
from transformer_comparison.attention import AttentionKernel, build_attention, kernel_class, kernel_options
from transformer_comparison.attention.registry import options_model, registered_names
from transformer_comparison.position import Rotary, alibi_slopes

NAMES = registered_names()
POSITIONS = ["none", "alibi", "rope"]


def positions_for(name: str) -> list[str]:
    refused = kernel_class(name).refused_positions
    return [p for p in POSITIONS if p not in refused]


def position_args(position: str, heads: int, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "alibi_slopes": alibi_slopes(heads, dtype=dtype) if position == "alibi" else None,
        "rope": Rotary() if position == "rope" else None,
    }


def causal_modes(name: str) -> list[bool]:
    return [True, False] if kernel_class(name).supports_non_causal else [True]


def qkv(heads: int = 4, kv_heads: int = 2, nq: int = 6, nk: int = 6, dtype: torch.dtype = torch.float32, d: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, nq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, kv_heads, nk, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, kv_heads, nk, d, generator=g).to(dtype).requires_grad_()
    return q, k, v


def integer_options() -> list[tuple[str, str]]:
    return [(name, option) for name in NAMES for option, default in kernel_options(name).items()
            if isinstance(default, int) and not isinstance(default, bool)]


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_mechanism_builds_with_its_defaults(name):
    attn = build_attention(name)
    assert isinstance(attn, AttentionKernel) and attn.name == name
    assert set(options_model(name).model_fields) == set(kernel_options(name))


def test_the_classic_options_and_their_single_defaults():
    assert kernel_options("local") == {"window": 32, "sinks": 0}
    assert kernel_options("sparse") == {"top_k": 16, "query_chunk": 256}
    assert kernel_options("flash") == {"block_size": 256, "use_sdpa": False}
    assert kernel_options("gqa") == {"kv_heads": None} and kernel_options("dot_product") == {}
    assert build_attention("local", window=5).window == 5


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="no_such") as error:
        build_attention("no_such")
    assert all(name in str(error.value) for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_refused_naming_the_valid_ones(name):
    with pytest.raises(ValueError, match="windw") as error:
        build_attention(name, windw=3)
    assert all(option in str(error.value) for option in kernel_options(name))


def lower_bound(name: str, option: str) -> int:
    field = options_model(name).model_fields[option]
    return next((meta.ge for meta in field.metadata if getattr(meta, "ge", None) is not None), 0)


@pytest.mark.parametrize("bad", ["below", 2.5, "8", True])
@pytest.mark.parametrize(("name", "option"), integer_options())
def test_integer_options_are_checked(name, option, bad):
    value = lower_bound(name, option) - 1 if bad == "below" else bad
    with pytest.raises(ValueError, match=option):
        build_attention(name, **{option: value})


# --- the kernel API -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inconsistent_shapes_are_refused_naming_the_problem(name):
    attn = build_attention(name)
    q, k, v = qkv()
    extra = extras(attn, 2, 4, 8, 6, torch.float32)
    for args, message in [((q[0], k, v), "4 dims"), ((q, k, v[:, :, :5]), "same shape"), ((q[..., :4], k, v), "head_dim"),
                          ((q.double(), k, v), "dtype"), (qkv(kv_heads=3), "kv_heads"), (qkv(nq=7, nk=6), "more positions")]:
        with pytest.raises(ValueError, match=message):
            attn(*args, **extra)
    with pytest.raises(ValueError, match="alibi_slopes"):
        attn(q, k, v, alibi_slopes=alibi_slopes(2), **extra)


@pytest.mark.parametrize("name", NAMES)
def test_causal_only_mechanisms_refuse_non_causal(name):
    if kernel_class(name).supports_non_causal:
        pytest.skip(f"{name} supports non-causal attention")
    attn = build_attention(name)
    with pytest.raises(ValueError, match="causal"):
        attn(*qkv(), causal=False, **extras(attn, 2, 4, 8, 6, torch.float32))


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_causal(name):
    """Changing the last key and value changes no earlier query's output."""
    attn = build_attention(name)
    for position in positions_for(name):
        q, k, v = (t.detach().double() for t in qkv(nq=9, nk=9))
        extra = extras(attn, 2, 4, 8, 9, torch.float64)
        args = position_args(position, 4, torch.float64)
        before = attn(q, k, v, **args, **extra)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, -1] += 3.0
        v2[:, :, -1] -= 2.0
        after = attn(q, k2, v2, **args, **extra)
        torch.testing.assert_close(after[:, :, :-1], before[:, :, :-1], **TIGHT)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_gives_finite_outputs_and_gradients(name, position):
    if position not in positions_for(name):
        pytest.skip(f"{name} refuses {position}")
    attn = build_attention(name)
    for causal in causal_modes(name):
        q, k, v = qkv(nq=9, nk=9, dtype=torch.bfloat16)
        out, entropy = attn(q, k, v, causal=causal, return_entropy=True, **position_args(position, 4),
                            **extras(attn, 2, 4, 8, 9, torch.bfloat16))
        assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()
        assert entropy is None or torch.isfinite(entropy).all()
        for grad in torch.autograd.grad(out.float().square().sum(), (q, k, v)):
            assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_entropy_is_per_query_and_bounded_or_absent(name):
    attn = build_attention(name)
    for causal in causal_modes(name):
        q, k, v = qkv(nq=3, nk=7)
        _, entropy = attn(q, k, v, causal=causal, return_entropy=True, **extras(attn, 2, 4, 8, 7, torch.float32))
        if not kernel_class(name).has_entropy:
            assert entropy is None
            continue
        assert entropy.shape == (2, 4, 3)
        assert (entropy >= -1e-5).all() and (entropy <= math.log(7) + 1e-5).all()


@pytest.mark.parametrize("name", NAMES)
def test_flop_model_grows_with_length(name):
    attn = build_attention(name)
    short, long = (attn.flops(batch=1, heads=4, nq=n, nk=n, head_dim=16, causal=True) for n in (256, 1024))
    dense_long = 4.0 * 4 * 16 * 1024 * 1025 / 2
    assert 0 < short < long < math.inf and long <= dense_long * 1.5


@pytest.mark.parametrize("name", NAMES)
def test_kv_heads_policy_gives_a_divisor_of_the_query_heads(name):
    attn = build_attention(name)
    for heads in (2, 4, 8):
        kv_heads = attn.kv_heads(heads, None)
        assert 1 <= kv_heads <= heads and heads % kv_heads == 0
    with pytest.raises(ValueError, match="kv_heads"):
        build_attention(name).kv_heads(4, 3) if name != "gqa" else build_attention(name, kv_heads=3).kv_heads(4, None)


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_the_full_call(name):
    """A prompt of 5 tokens then 4 tokens one at a time through `decode` give the full call's rows."""
    attn = build_attention(name)
    for position in positions_for(name):
        q, k, v = (t.detach().double() for t in qkv(nq=9, nk=9))
        extra = extras(attn, 2, 4, 8, 9, torch.float64)
        args = position_args(position, 4, torch.float64)
        full = attn(q, k, v, **args, **extra)
        cache = attn.new_cache()
        steps = [slice(0, 5)] + [slice(i, i + 1) for i in range(5, 9)]
        rows = [attn.decode(q[:, :, s], k[:, :, s], v[:, :, s], cache, **args,
                            **{key: t[:, :, s] for key, t in extra.items()}) for s in steps]
        torch.testing.assert_close(torch.cat(rows, dim=2), full, rtol=1e-8, atol=1e-9)
        assert cache.position == 9 and cache.nbytes > 0
