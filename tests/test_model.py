"""The GPT model: weight tying, the documented initialisation, parameter and FLOP counts, causality and
entropy for every mechanism x encoding, and how each encoding reaches the kernels."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_comparison.attention import ATTENTION_TYPES, kernel_class
from transformer_comparison.model import GPT, GPTConfig
from transformer_comparison.position import POSITION_TYPES, Rotary, alibi_slopes, kernel_position_args, sinusoidal_encoding

OPTIONS = {"local": {"window": 5}, "sparse": {"top_k": 3}, "flash": {"block_size": 4}, "linear": {"chunk_size": 4}}


def small_gpt(attention: str = "dot_product", position: str = "sinusoidal", seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    settings = dict(vocab_size=37, context_length=16, d_model=32, num_heads=4, num_layers=2,
                    num_kv_heads=2 if attention == "gqa" else None, attention_type=attention,
                    attention_options=OPTIONS.get(attention, {}), position_embedding=position)
    return GPT(GPTConfig(**(settings | changes))).eval()


def test_the_output_head_is_the_token_embedding():
    model = small_gpt()
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_initialisation_follows_the_documented_scheme():
    """Linear layers std 1/sqrt(fan_in), residual projections also / sqrt(2 layers), embedding d^-1/2."""
    model = small_gpt(d_model=256, num_layers=3, vocab_size=500, seed=3)
    residual_scale = math.sqrt(2 * 3)
    for name, param in model.named_parameters():
        if name == "token_embedding.weight":
            expected = 256 ** -0.5
        elif name.endswith("proj.weight"):
            expected = 1 / math.sqrt(param.shape[1]) / residual_scale
        elif param.dim() == 2:
            expected = 1 / math.sqrt(param.shape[1])
        else:  # LayerNorm weights
            assert torch.all(param == 1), name
            continue
        assert abs(param.std().item() / expected - 1) < 0.05, (name, param.std().item(), expected)
        assert abs(param.mean().item()) < 0.1 * expected, name


def test_initial_loss_is_close_to_uniform_guessing():
    model = small_gpt(d_model=64, vocab_size=65)
    generator = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 65, (2, 8, 16), generator=generator)
    _, loss, _ = model(idx, targets=targets)  # targets unrelated to the inputs (the tied head favours the input token)
    assert math.log(65) - 0.1 < loss.item() < math.log(65) + 1.0


def test_parameter_count_by_hand():
    """Embedding V d; per layer qkv (H + 2 KV) hd x d, proj d x d, MLP 2 x 4 d^2, two LayerNorm weights; final LayerNorm."""
    vocab, d, layers, heads, kv_heads = 37, 32, 2, 4, 2
    per_layer = (heads + 2 * kv_heads) * (d // heads) * d + d * d + 8 * d * d + 2 * d
    expected = vocab * d + layers * per_layer + d
    assert small_gpt("gqa").num_parameters() == expected
    full = vocab * d + layers * (3 * d * d + d * d + 8 * d * d + 2 * d) + d
    assert small_gpt("dot_product").num_parameters() == full


def test_flops_per_token_is_6n_plus_the_mechanisms_own_attention_term():
    model = small_gpt()  # dot_product, 2 layers, d_model 32, context 16
    non_embedding = model.num_parameters() - 37 * 32
    causal_pairs_per_token = 17 / 2  # sum_{p < 16} (p + 1) / 16
    assert model.flops_per_token() == round(6 * non_embedding + 3 * 2 * 4 * 32 * causal_pairs_per_token)
    local = small_gpt("local")  # window 5: fewer pairs, fewer FLOPs, the same weights
    assert local.flops_per_token() < model.flops_per_token()
    assert local.num_parameters() == model.num_parameters()


@pytest.mark.parametrize("position", POSITION_TYPES)
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_no_logit_depends_on_a_later_token(attention, position):
    model = small_gpt(attention, position)
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 37
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-5)
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-4  # the change is seen from position 9 on


@pytest.mark.parametrize("position", POSITION_TYPES)
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_entropy_per_layer_batch_head_and_query(attention, position):
    model = small_gpt(attention, position)
    idx = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss, entropy = model(idx, targets=idx, return_entropy=True)
        plain_logits = model(idx)[0]
    torch.testing.assert_close(logits, plain_logits)  # asking for entropy does not change the output
    assert loss is not None and math.isfinite(loss.item())
    if not kernel_class(attention).has_entropy:
        assert entropy is None  # no attention distribution
        return
    assert entropy.shape == (2, 3, 4, 16)
    visible = torch.arange(1, 17, dtype=torch.float32).clamp(max=OPTIONS.get(attention, {}).get("window", 16))
    assert torch.all(entropy >= -1e-5) and torch.all(entropy <= visible.log() + 1e-4)


def test_positions_beyond_the_table_continue_the_formula():
    model = small_gpt(position="sinusoidal")
    rows = model.position_rows(8, start=12)  # 12 .. 19 crosses the context of 16
    expected = sinusoidal_encoding(20, 32)[12:] / math.sqrt(32)
    torch.testing.assert_close(rows, expected)
    assert small_gpt(position="rope").position_table is None


def test_kernel_position_args_per_encoding():
    assert kernel_position_args("sinusoidal", 4) == {"rope": None, "alibi_slopes": None}
    rope = kernel_position_args("rope", 4, rope_base=500.0)
    assert rope["alibi_slopes"] is None and rope["rope"] == Rotary(500.0)
    alibi = kernel_position_args("alibi", 8)
    assert alibi["rope"] is None
    torch.testing.assert_close(alibi["alibi_slopes"], alibi_slopes(8))
    with pytest.raises(ValueError, match="unknown position embedding 'learned'; valid: .*sinusoidal"):
        kernel_position_args("learned", 4)


def test_every_block_receives_the_encoding():
    model = small_gpt("local", "alibi")
    for block in model.blocks:
        torch.testing.assert_close(block.attn.alibi_slopes, alibi_slopes(4))
        assert block.attn.rope is None and block.attn.kernel.window == 5
    assert all(block.attn.rope.base == 10000.0 and block.attn.rope.scaling == "none" for block in small_gpt("flash", "rope").blocks)


def test_decoding_arguments_are_checked():
    model = small_gpt()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="expected one per layer"):
        model(idx, caches=model.new_caches()[:1])
    with pytest.raises(ValueError, match="return_entropy is not available"):
        model(idx, caches=model.new_caches(), return_entropy=True)


def test_short_convolution_is_causal_and_continues_across_calls():
    from transformer_comparison.model import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    x = torch.randn(2, 10, 6)
    y, tail = conv(x)
    changed = x.clone()
    changed[:, 6] += 1.0
    y_changed, _ = conv(changed)
    torch.testing.assert_close(y[:, :6], y_changed[:, :6], rtol=0, atol=0)  # no output sees a later input
    assert (y[:, 6:] - y_changed[:, 6:]).abs().amax(-1).min() > 0  # ... and x_6 reaches y_6 .. y_9 (width 4)
    first, first_tail = conv(x[:, :3])
    rest, rest_tail = conv(x[:, 3:], first_tail)
    torch.testing.assert_close(torch.cat([first, rest], 1), y)
    torch.testing.assert_close(rest_tail, tail)
    torch.testing.assert_close(tail, x[:, -3:])
    by_hand = torch.nn.functional.silu(sum(conv.conv.weight[:, 0, 3 - i] * x[:, 5 - i] for i in range(4)))
    torch.testing.assert_close(y[:, 5], by_hand)


def test_short_convolution_off_by_default_changes_nothing():
    plain, off = small_gpt("linear"), small_gpt("linear", short_conv=0)
    assert plain.state_dict().keys() == off.state_dict().keys()
    with_conv = small_gpt("linear", short_conv=4)
    extra = set(with_conv.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.attn.short_conv.conv.weight" for i in range(2)}
    assert with_conv.num_parameters() - plain.num_parameters() == 2 * 4 * plain.blocks[0].attn.qkv.out_features
