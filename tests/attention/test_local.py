"""local: sliding-window causal attention in bands, against the reference with its window mask."""

from __future__ import annotations

import pytest
import torch

import transformer_comparison.attention.local as local_module
from tests.attention.conftest import make_qkv
from tests.attention.checks import (
    POSITIONS,
    TIGHT,
    LargestTensor,
    assert_matches_reference,
    assert_no_queries_give_empty_results,
    assert_no_repeated_kv,
    saved_bytes,
)
from transformer_comparison.attention import build_attention
from transformer_comparison.position import Rotary, alibi_slopes


@pytest.fixture(params=[None, (3, 1), (4, 600)], ids=["default_bands", "block3_chunk1", "block4_chunk600"])
def band_layout(request, monkeypatch):
    """Run with the tuned band size, and with bands of 3 or 4 queries processed one or a few at a time,
    so that small n spans several bands and several groups of bands."""
    if request.param is not None:
        monkeypatch.setattr(local_module, "BLOCK", request.param[0])
        monkeypatch.setattr(local_module, "CHUNK_SCORES", request.param[1])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("window", [1, 3, 40])
@pytest.mark.parametrize("n", [1, 7, 11])
def test_matches_reference(band_layout, n, window, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + window + kv_heads)
    attn = build_attention("local", window=window)
    assert_matches_reference("local", attn, q, k, v, position=position, window=window)


@pytest.mark.parametrize("n", [63, 64, 65, 150])
def test_lengths_around_the_default_band_size(n):
    q, k, v = make_qkv(1, 2, 1, n, head_dim=4, seed=n)
    attn = build_attention("local", window=70)
    assert_matches_reference("local", attn, q, k, v, position="alibi+rope", window=70)


@pytest.mark.parametrize("window", [1, 4, 11, 20])
@pytest.mark.parametrize("nq", [1, 3])
def test_decoding_gives_the_last_rows_of_the_full_reference(band_layout, nq, window):
    q, k, v = make_qkv(1, 4, 2, 11, seed=3)
    attn = build_attention("local", window=window)
    assert_matches_reference("local", attn, q, k, v, position="alibi+rope", last=nq, window=window)


def test_a_cache_that_dropped_old_keys_moves_the_rope_offset():
    """Decoding position 11 from only the last `window` keys, with Rotary(offset=first kept position)."""
    q, k, v = make_qkv(1, 4, 2, 12, seed=9)
    attn = build_attention("local", window=5)
    full = attn(q, k, v, rope=Rotary())[:, :, -1:]
    cached = attn(q[:, :, -1:], k[:, :, -5:], v[:, :, -5:], rope=Rotary(offset=7))
    torch.testing.assert_close(cached, full, **TIGHT)


@pytest.mark.parametrize("n", [1, 5, 9])
def test_equals_dot_product_when_the_window_covers_the_sequence(band_layout, n):
    q, k, v = make_qkv(2, 4, 2, n, seed=10 + n)
    options = {"alibi_slopes": alibi_slopes(4, dtype=q.dtype), "rope": Rotary(), "return_entropy": True}
    for window in (n, n + 1, 1000):
        got = build_attention("local", window=window)(q, k, v, **options)
        expected = build_attention("dot_product")(q, k, v, **options)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TIGHT)


def test_window_one_attends_to_itself_only():
    q, k, v = make_qkv(1, 2, 2, 6, seed=11)
    out, entropy = build_attention("local", window=1)(q, k, v, return_entropy=True)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-12)
    assert entropy.abs().max() < 1e-12


def test_non_causal_is_refused():
    q, k, v = make_qkv(1, 2, 2, 4)
    with pytest.raises(ValueError, match="causal"):
        build_attention("local", window=2)(q, k, v, causal=False)


def test_memory_kept_for_backward_grows_linearly_with_length():
    small, large = (saved_bytes(build_attention("local", window=16), n) for n in (512, 2048))
    assert large / small < 5, f"saved {small} bytes at n=512 but {large} at n=2048: not linear"


def test_kv_heads_are_broadcast_not_copied():
    assert_no_repeated_kv(build_attention("local", window=16), nk=64)


def test_decoding_touches_only_the_window_of_a_long_cache():
    q = torch.randn(1, 2, 1, 8)
    k, v = torch.randn(1, 2, 4096, 8), torch.randn(1, 2, 4096, 8)
    with LargestTensor() as probe:
        build_attention("local", window=16)(q, k, v, alibi_slopes=alibi_slopes(2), rope=Rotary(), return_entropy=True)
    assert probe.numel <= 2 * 16 * 8, f"an intermediate of {probe.numel} elements for a window of 16 keys"


@pytest.mark.parametrize("nk", [0, 5])
def test_no_queries_give_empty_results(nk):
    assert_no_queries_give_empty_results(build_attention("local"), nk)


# --- attention sinks ------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize(("n", "window", "sinks", "kv_heads"), [(7, 3, 1, 4), (11, 3, 4, 1), (40, 5, 2, 2), (9, 40, 3, 4)])
def test_sinks_match_the_reference(band_layout, n, window, sinks, kv_heads, position):
    q, k, v = make_qkv(2, 4, kv_heads, n, seed=n + sinks)
    attn = build_attention("local", window=window, sinks=sinks)
    assert_matches_reference("local", attn, q, k, v, position=position, window=window, sinks=sinks)


@pytest.mark.parametrize("last", [1, 5])
def test_sinks_with_end_aligned_queries(last):
    q, k, v = make_qkv(1, 4, 2, 30, seed=last)
    attn = build_attention("local", window=6, sinks=3)
    assert_matches_reference("local", attn, q, k, v, position="alibi+rope", window=6, sinks=3, last=last)


@pytest.mark.parametrize("position", POSITIONS)
def test_sink_decoding_is_the_full_call_and_stays_bounded(position):
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 60, seed=1))
    slopes = alibi_slopes(4, dtype=torch.float64) if "alibi" in position else None
    rope = Rotary() if "rope" in position else None
    attn = build_attention("local", window=8, sinks=3)
    full = attn(q, k, v, alibi_slopes=slopes, rope=rope)
    cache, rows, sizes = attn.new_cache(), [], []
    for part in [slice(0, 5), *[slice(i, i + 1) for i in range(5, 60)]]:
        rows.append(attn.decode(q[:, :, part], k[:, :, part], v[:, :, part], cache, alibi_slopes=slopes, rope=rope))
        sizes.append(cache.nbytes)
    torch.testing.assert_close(torch.cat(rows, dim=2), full, **TIGHT)
    per_key = 2 * 2 * 8 * 8  # k and v, 2 kv heads, head_dim 8, float64
    assert sizes[-1] == sizes[20] == (3 + 8 - 1) * per_key  # the sinks and the last window - 1 keys, constant


def test_no_sinks_is_plain_local_attention():
    q, k, v = make_qkv(1, 4, 2, 50, seed=3)
    plain = build_attention("local", window=6)(q, k, v)
    assert torch.equal(build_attention("local", window=6, sinks=0)(q, k, v), plain)
    assert not torch.equal(build_attention("local", window=6, sinks=2)(q, k, v), plain)
