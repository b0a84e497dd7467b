"""The mechanism API as a user of `build_attention` sees it: names, options, input checks, low precision."""

from __future__ import annotations

import pytest
import torch

from transformer_comparison.attention import ATTENTION_TYPES, AttentionKernel, build_attention, kernel_options
from transformer_comparison.attention.registry import registered_names
from transformer_comparison.position import Rotary, alibi_slopes


def qkv(heads: int = 4, kv_heads: int = 2, nq: int = 6, nk: int = 6, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, nq, 8, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, kv_heads, nk, 8, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, kv_heads, nk, 8, generator=g).to(dtype).requires_grad_()
    return q, k, v


def integer_options() -> list[tuple[str, str]]:
    """(mechanism, option) for every integer option (window, top_k, block_size, chunk_size, ...)."""
    return [
        (name, option)
        for name in ATTENTION_TYPES
        for option, default in kernel_options(name).items()
        if isinstance(default, int) and not isinstance(default, bool)
    ]


def test_the_six_mechanisms_are_registered_in_order():
    assert ATTENTION_TYPES == ("dot_product", "linear", "sparse", "local", "gqa", "flash")
    assert set(registered_names()) == set(ATTENTION_TYPES)


@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_every_mechanism_builds_with_its_defaults(name):
    attn = build_attention(name)
    assert isinstance(attn, AttentionKernel) and attn.name == name
    for option, default in kernel_options(name).items():
        assert f"{option}={default!r}" in repr(attn)


def test_documented_options_and_defaults():
    assert kernel_options("local") == {"window": 128}
    assert kernel_options("sparse") == {"top_k": 32, "query_chunk": 256}
    assert kernel_options("gqa") == {} and kernel_options("dot_product") == {}
    assert build_attention("local", window=5).window == 5
    assert build_attention("sparse", top_k=3, query_chunk=7).top_k == 3


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="nope") as error:
        build_attention("nope")
    for name in ATTENTION_TYPES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_an_unknown_option_is_refused_naming_the_valid_ones(name):
    with pytest.raises(ValueError, match="windw") as error:
        build_attention(name, windw=3)
    for option in kernel_options(name):
        assert option in str(error.value)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True, None])
@pytest.mark.parametrize(("name", "option"), integer_options())
def test_integer_options_must_be_at_least_one(name, option, bad):
    with pytest.raises(ValueError, match=option):
        build_attention(name, **{option: bad})


def test_the_integer_options_include_the_documented_ones():
    found = set(integer_options())
    for expected in [("local", "window"), ("sparse", "top_k"), ("sparse", "query_chunk")]:
        assert expected in found
    assert {option for _, option in found} >= {"window", "top_k", "block_size", "chunk_size"}


@pytest.mark.parametrize("name", ATTENTION_TYPES)
@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"kv_heads": 3}, "kv_heads"),
        ({"nq": 7, "nk": 6}, "more positions"),
    ],
)
def test_inconsistent_head_or_length_counts_are_refused(name, shapes, message):
    with pytest.raises(ValueError, match=message):
        build_attention(name)(*qkv(**shapes))


@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_malformed_inputs_are_refused_naming_the_problem(name):
    attn = build_attention(name)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4 dims"):
        attn(q[0], k, v)
    with pytest.raises(ValueError, match="4 dims"):
        attn(q, k, v[..., None])
    with pytest.raises(ValueError, match="same shape"):
        attn(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="head_dim"):
        attn(q[..., :4], k, v)
    with pytest.raises(ValueError, match="dtype"):
        attn(q.double(), k, v)
    with pytest.raises(ValueError, match="alibi_slopes"):
        attn(q, k, v, alibi_slopes=alibi_slopes(2))


def test_local_attention_refuses_non_causal():
    with pytest.raises(ValueError, match="causal"):
        build_attention("local", window=4)(*qkv(), causal=False)


def causal_modes(name: str) -> list[bool]:
    return [True] if name == "local" else [True, False]


@pytest.mark.parametrize("position", ["none", "alibi", "rope"])
@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_bfloat16_gives_finite_outputs_and_gradients(name, position):
    attn = build_attention(name)
    for causal in causal_modes(name):
        q, k, v = qkv(nq=9, nk=9, dtype=torch.bfloat16)
        out, entropy = attn(
            q, k, v, causal=causal, return_entropy=True,
            alibi_slopes=alibi_slopes(4) if position == "alibi" else None,
            rope=Rotary() if position == "rope" else None,
        )
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        assert torch.isfinite(out).all() and torch.isfinite(entropy).all()
        for grad in torch.autograd.grad(out.float().square().sum(), (q, k, v)):
            assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ATTENTION_TYPES)
def test_entropy_is_per_query_and_between_zero_and_log_of_the_key_count(name):
    attn = build_attention(name)
    for causal in causal_modes(name):
        q, k, v = qkv(nq=3, nk=7)
        _, entropy = attn(q, k, v, causal=causal, return_entropy=True)
        assert entropy.shape == (2, 4, 3)
        assert (entropy >= -1e-5).all() and (entropy <= torch.log(torch.tensor(7.0)) + 1e-5).all()
