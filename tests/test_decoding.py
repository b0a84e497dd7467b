"""Decoding from caches: exact against the full forward pass for every mechanism x encoding, cache sizes,
cached against uncached generation (docs/decoding.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.attention.conftest import make_qkv
from tests.attention.test_conformance import extras
from tests.helpers import run_cli, tiny_config
from transformer_comparison.attention import ATTENTION_TYPES, build_attention, kernel_class
from transformer_comparison.attention.cache import MIN_CAPACITY, KVCache, caches_nbytes
from transformer_comparison.attention.linear import LinearState
from transformer_comparison.generate import sample
from transformer_comparison.model import GPT, GPTConfig
from transformer_comparison.position import POSITION_TYPES, Rotary, alibi_slopes, sinusoidal_encoding

OPTIONS = {"local": {"window": 5}, "sparse": {"top_k": 3}, "flash": {"block_size": 4}, "linear": {"chunk_size": 4}}
CONTEXT = 24
# new tokens per call: a prompt, single tokens, and prefills of several tokens on a non-empty cache;
# 33 in all, beyond the context of 24 (positions keep counting: sinusoidal rows computed afresh)
STEPS = [5, 1, 1, 4, 1, 7, 1, 1, 1, 1, 6, 1, 1, 1, 1]


def small_gpt(attention: str, position: str, seed: int = 0, kv_heads: int | None = None, **changes) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=50, context_length=CONTEXT, d_model=32, num_heads=4, num_layers=2,
        num_kv_heads=kv_heads or (2 if attention == "gqa" else None), attention_type=attention,
        attention_options=OPTIONS.get(attention, {}), position_embedding=position, **changes,
    )
    return GPT(config).eval()


def decode_in_steps(model: GPT, idx: torch.Tensor, steps: list[int]) -> tuple[torch.Tensor, list]:
    caches = model.new_caches()
    logits, start = [], 0
    with torch.no_grad():
        for n in steps:
            logits.append(model(idx[:, start : start + n], caches=caches)[0])
            start += n
    return torch.cat(logits, dim=1), caches


@pytest.mark.parametrize("position", POSITION_TYPES)
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_cached_decoding_matches_the_full_forward_pass(attention, position):
    model = small_gpt(attention, position)
    idx = torch.randint(0, 50, (2, sum(STEPS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)[0]
    cached, caches = decode_in_steps(model, idx, STEPS)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    assert all(cache.position == idx.shape[1] for cache in caches)


KERNEL_POSITIONS = ["none", "rope", "alibi", "alibi+rope"]


@pytest.mark.parametrize("position", KERNEL_POSITIONS)
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_kernel_decode_gives_the_rows_of_the_full_call(attention, position):
    """float64, 4 query heads over 2 kv heads, RoPE and ALiBi together: exact to rounding."""
    refused = kernel_class(attention).refused_positions
    if any(part in refused for part in position.split("+")):
        pytest.skip(f"{attention} refuses {position}")
    q, k, v = make_qkv(2, 4, 2, 19, seed=5)
    q, k, v = q.detach(), k.detach(), v.detach()
    kernel = build_attention(attention, **OPTIONS.get(attention, {}))
    extra = extras(kernel, 2, 4, q.shape[-1], 19, torch.float64)
    rope = Rotary() if "rope" in position else None
    slopes = alibi_slopes(4, dtype=torch.float64) if "alibi" in position else None
    full = kernel(q, k, v, causal=True, alibi_slopes=slopes, rope=rope, **extra)
    cache, outs, start = kernel.new_cache(), [], 0
    for n in [3, 1, 1, 6, 1, 1, 5, 1]:
        stop = start + n
        outs.append(kernel.decode(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], cache,
                                  alibi_slopes=slopes, rope=rope, **{key: t[:, :, start:stop] for key, t in extra.items()}))
        start = stop
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-10, rtol=0)


def test_low_precision_decoding_keeps_the_dtype():
    for attention in ATTENTION_TYPES:
        kernel = build_attention(attention, **OPTIONS.get(attention, {}))
        q, k, v = (t.detach().to(torch.bfloat16) for t in make_qkv(1, 4, 2, 6, seed=2))
        refused = kernel_class(attention).refused_positions
        positions = {"alibi_slopes": None if "alibi" in refused else alibi_slopes(4),
                     "rope": None if "rope" in refused else Rotary()}
        cache = kernel.new_cache()
        extra = extras(kernel, 1, 4, q.shape[-1], 6, torch.bfloat16)
        out = kernel.decode(q, k, v, cache, **positions, **extra)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()


def test_local_cache_stays_constant_beyond_the_window():
    model = small_gpt("local", "rope")  # window 5: 4 keys kept per layer
    caches = model.new_caches()
    per_key = 2 * 2 * 4 * 8 * 4  # layers * (k and v) * kv_heads * head_dim * float32 bytes, batch 1
    held, allocated = [], []
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 9)), caches=caches)  # a prefill longer than the window
        for token in torch.randint(0, 50, (200,)):
            model(token.view(1, 1), caches=caches)
            held.append(caches_nbytes(caches))
            allocated.append(sum(c.allocated_bytes for c in caches))
    assert set(held) == {4 * per_key}
    assert max(allocated[20:]) <= (2 * 4 + 9) * per_key  # bounded buffer: no growth with the sequence
    assert [c.first_position for c in caches] == [209 - 4] * 2


def test_gqa_cache_is_kv_heads_over_heads_of_dot_products():
    idx = torch.randint(0, 50, (2, 13))
    sizes = {}
    for attention, kv_heads in [("dot_product", None), ("gqa", 2), ("gqa", 1)]:
        _, caches = decode_in_steps(small_gpt(attention, "alibi", kv_heads=kv_heads), idx, [6, 1, 1, 5])
        sizes[(attention, kv_heads)] = caches_nbytes(caches)
    dense = sizes[("dot_product", None)]
    assert dense == 2 * 2 * 2 * 4 * 13 * 8 * 4  # layers * (k, v) * batch * heads * tokens * head_dim * bytes
    assert sizes[("gqa", 2)] * 2 == dense
    assert sizes[("gqa", 1)] * 4 == dense


@pytest.mark.parametrize("position", POSITION_TYPES)
def test_linear_state_does_not_grow(position):
    model = small_gpt("linear", position)
    caches = model.new_caches()
    sizes = []
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 5)), caches=caches)
        sizes.append(caches_nbytes(caches))
        for token in torch.randint(0, 50, (100,)):
            model(token.view(1, 1), caches=caches)
        model(torch.randint(0, 50, (1, 30)), caches=caches)
        sizes.append(caches_nbytes(caches))
    assert all(isinstance(c, LinearState) for c in caches)
    groups = 1  # 4 kv heads for 4 heads: one state per head either way
    assert sizes == [2 * 4 * groups * (8 * 8 + 8) * 4] * 2  # layers * heads * (S: d x d, z: d) * bytes
    assert caches[0].position == 135


def test_linear_alibi_state_is_per_query_head_under_gqa_kv_heads():
    """With ALiBi every query head decays at its own rate, so the state cannot be shared by a kv group."""
    kernel = build_attention("linear")
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 3, seed=4))
    plain, decayed = kernel.new_cache(), kernel.new_cache()
    kernel.decode(q, k, v, plain)
    kernel.decode(q, k, v, decayed, alibi_slopes=alibi_slopes(4, dtype=torch.float64))
    assert plain.s.shape == (1, 2, 1, 8, 8) and decayed.s.shape == (1, 2, 2, 8, 8)


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_greedy_sampling_is_the_same_with_and_without_cache(attention):
    model = small_gpt(attention, "rope" if attention != "linear" else "alibi")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    generator = torch.Generator()
    cached = sample(model, prompt, CONTEXT - 5, 0.0, None, generator, use_cache=True)
    uncached = sample(model, prompt, CONTEXT - 5, 0.0, None, generator, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cached_sampling_beyond_the_context_rebuilds_its_caches(monkeypatch):
    model = small_gpt("dot_product", "sinusoidal")
    prefills = []
    forward = GPT.forward

    def spy(self, idx, *args, caches=None, **kwargs):
        if caches is not None and caches[0].position == 0:
            prefills.append(idx.shape[1])
        return forward(self, idx, *args, caches=caches, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    out = sample(model, torch.tensor([[1] * 30]), 40, 1.0, 5, torch.Generator().manual_seed(0))
    assert out.shape == (1, 70)
    # the 30-token prompt cropped to the context, then a rebuild from half of it whenever the caches fill
    assert prefills == [CONTEXT] + [CONTEXT // 2] * 3


def test_decoding_errors_are_clear():
    model = small_gpt("linear", "rope")
    with pytest.raises(ValueError, match="one per layer"):
        model(torch.zeros(1, 2, dtype=torch.long), caches=model.new_caches()[:1])
    with pytest.raises(ValueError, match="entropy"):
        model(torch.zeros(1, 2, dtype=torch.long), return_entropy=True, caches=model.new_caches())
    q, k, v = (t.detach() for t in make_qkv(1, 4, 4, 3))
    with pytest.raises(ValueError, match="LinearState"):
        build_attention("linear").decode(q, k, v, KVCache())
    with pytest.raises(ValueError, match="KVCache"):
        build_attention("dot_product").decode(q, k, v, LinearState())
    with pytest.raises(ValueError, match="same n"):
        build_attention("dot_product").decode(q[:, :, :1], k, v, KVCache())


def test_kv_cache_appends_evicts_and_reallocates():
    cache = KVCache(max_keys=3)
    keys = torch.arange(40, dtype=torch.float32).view(1, 1, 40, 1)
    cache.append(keys[:, :, :5], -keys[:, :, :5])
    assert cache.position == 5 and cache.k.flatten().tolist() == [0, 1, 2, 3, 4]
    cache.evict()
    assert cache.first_position == 2 and cache.k.flatten().tolist() == [2, 3, 4]
    for i in range(5, 40):
        cache.append(keys[:, :, i : i + 1], -keys[:, :, i : i + 1])
        assert cache.k.flatten().tolist() == list(range(max(0, i - 3), i + 1))[-4:]
        assert torch.equal(cache.v, -cache.k)
        cache.evict()
    assert cache.first_position == 37 and cache.position == 40
    assert cache.allocated_bytes <= 2 * max(MIN_CAPACITY, 3 + 5 + 3) * 4  # bounded: k and v, 1 float each
    with pytest.raises(ValueError, match="do not match"):
        cache.append(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))


def test_sinusoidal_rows_from_any_start_match_the_table():
    model = small_gpt("dot_product", "sinusoidal")
    table = sinusoidal_encoding(100, 32) / 32**0.5
    for start, n in [(0, 24), (10, 5), (20, 10), (50, 1), (0, 100)]:
        torch.testing.assert_close(model.position_rows(n, start), table[start : start + n], atol=1e-7, rtol=0)


@pytest.mark.slow
def test_generate_cli_greedy_output_is_the_same_with_and_without_cache(tmp_path: Path):
    config = tiny_config(tmp_path, model={"num_layers": 2}, attention={"type": "local", "window": 4},
                         position={"type": "rope"})
    run_dir = tmp_path / "run"
    trained = run_cli("train", "--config", str(config), "--out", str(run_dir))
    assert trained.returncode == 0, trained.stderr
    outputs = []
    for extra in ([], ["--no_cache"]):
        result = run_cli("generate", "--run", str(run_dir), "--prompt", "the ", "--max_new_tokens", "11",
                         "--temperature", "0", *extra)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and outputs[0].startswith("the ")  # 15 tokens: within the context of 16


@pytest.mark.parametrize("attention", ["dot_product", "local", "linear", "deltanet"])
def test_cached_decoding_with_a_short_convolution_matches_the_full_pass(attention):
    """The layer cache carries the convolution's last K - 1 inputs across calls of any size."""
    model = small_gpt(attention, "rope", short_conv=4)
    idx = torch.randint(0, 50, (2, sum(STEPS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)[0]
    cached, caches = decode_in_steps(model, idx, STEPS)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    plain = small_gpt(attention, "rope")
    _, plain_caches = decode_in_steps(plain, idx, STEPS)
    width = model.blocks[0].attn.qkv.out_features
    assert caches[0].nbytes == plain_caches[0].nbytes + 2 * 3 * width * 4  # batch 2, K - 1 = 3 float32 rows
