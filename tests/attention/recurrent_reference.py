"""Naive token-by-token references for the recurrent mechanisms, and the checks the four test files share.

The references are written from the papers' recurrences with nothing shared with the kernels: an
explicit d x d state per head, updated one token at a time in the input dtype (tests use float64),
with decay *factors* (not log decays) and the delta rule as the matrix product
S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t (rows: o_t = q_t S_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tests.attention.checks import TIGHT
from tests.attention.conftest import make_qkv
from transformer_comparison.attention.base import AttentionKernel
from transformer_comparison.position import Rotary, alibi_slopes
from transformer_comparison.position.rope import apply_rope

EPS = 1e-6  # of the RMS output normalisation and of the L2 normalisation of q and k
DELTA_RULE = ("deltanet", "gated_deltanet")


def retention_gammas(heads: int, dtype: torch.dtype) -> Tensor:
    """The RetNet schedule: gamma_h = 1 - 2^(-5 - h)."""
    return torch.tensor([1.0 - 2.0 ** (-5 - h) for h in range(heads)], dtype=dtype)


def naive_recurrence(
    mechanism: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: Tensor | None = None,
    beta: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    rope_base: float | None = None,
    output_norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """Outputs of the nq end-aligned queries (B, H, nq, d) and the final state (B, H, d, d).

    decay: gla's per-channel factors alpha (B, H, n, d) or gated_deltanet's scalar alpha (B, H, n);
    retention uses its fixed schedule; ALiBi multiplies every step's decay by exp(-m_h).
    beta: the delta rule's write strengths (B, H, n).
    """
    batch, heads, nq, dim = q.shape
    nk = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if mechanism in DELTA_RULE:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + EPS)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + EPS)
    q = q / dim**0.5
    if rope_base is not None:
        q = apply_rope(q, torch.arange(nk - nq, nk), rope_base)
        k = apply_rope(k, torch.arange(nk), rope_base)
    alibi = torch.ones(heads, dtype=q.dtype) if alibi_slopes is None else torch.exp(-alibi_slopes)
    eye = torch.eye(dim, dtype=q.dtype)
    state = torch.zeros(batch, heads, dim, v.shape[-1], dtype=q.dtype)
    outputs = []
    for t in range(nk):
        k_col, v_row = k[:, :, t, :, None], v[:, :, t, None, :]  # (B, H, d, 1), (B, H, 1, d)
        if mechanism == "retention":
            state = (retention_gammas(heads, q.dtype) * alibi)[:, None, None] * state + k_col @ v_row
        elif mechanism == "gla":
            state = (decay[:, :, t] * alibi[:, None])[..., None] * state + k_col @ v_row
        else:
            a = alibi[:, None, None] if mechanism == "deltanet" else decay[:, :, t, None, None] * alibi[:, None, None]
            b = beta[:, :, t, None, None]
            state = a * ((eye - b * (k_col @ k_col.mT)) @ state) + b * (k_col @ v_row)
        if t >= nk - nq:
            outputs.append(q[:, :, t - (nk - nq), None, :] @ state)
    out = torch.cat(outputs, 2) if outputs else q.new_zeros(batch, heads, 0, v.shape[-1])
    if output_norm:
        out = out / torch.sqrt((out * out).mean(-1, keepdim=True) + EPS)
    return out, state


def random_extras(mechanism: str, batch: int, heads: int, n: int, dim: int, seed: int = 0,
                  dtype: torch.dtype = torch.float64, strength: float = 1.0) -> dict[str, Tensor]:
    """Leaf tensors (requiring grad) shaped as each mechanism's layer_inputs gives them.

    strength scales the log decays: 1 is a moderate decay, large values a very strong one.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    extras = {}
    if mechanism == "gla":
        extras["log_decay"] = F.logsigmoid(torch.randn(batch, heads, n, dim, generator=g, dtype=dtype)) * strength / 4
    if mechanism == "gated_deltanet":
        extras["log_decay"] = -F.softplus(torch.randn(batch, heads, n, generator=g, dtype=dtype)) * strength / 4
    if mechanism in DELTA_RULE:
        extras["beta"] = torch.sigmoid(torch.randn(batch, heads, n, generator=g, dtype=dtype))
    return {key: t.detach().requires_grad_() for key, t in extras.items()}


def reference_from_extras(mechanism: str, q: Tensor, k: Tensor, v: Tensor, extras: dict[str, Tensor], **options) -> Tensor:
    """`naive_recurrence` given the kernel's extras (log decays -> decay factors)."""
    decay = extras["log_decay"].exp() if "log_decay" in extras else None
    return naive_recurrence(mechanism, q, k, v, decay=decay, beta=extras.get("beta"), **options)[0]


def position_args(position: str, heads: int, dtype: torch.dtype) -> tuple[Tensor | None, float | None]:
    """(ALiBi slopes, RoPE base) for "none", "alibi", "rope" or "alibi+rope"."""
    return (alibi_slopes(heads, dtype=dtype) if "alibi" in position else None), (10000.0 if "rope" in position else None)


def assert_matches_naive(
    mechanism: str, attn: AttentionKernel, q: Tensor, k: Tensor, v: Tensor, extras: dict[str, Tensor], *,
    position: str = "none", slopes: Tensor | None = None, last: int | None = None,
) -> None:
    """Output (entropy None) and the gradients of q, k, v and every extra equal the naive recurrence.

    `last`: the kernel gets only the last `last` queries (end-aligned) and must give the last rows.
    """
    alibi, rope_base = position_args(position, q.shape[1], q.dtype)
    slopes = alibi if slopes is None else slopes
    rows = slice(-last if last else 0, None)
    rope = None if rope_base is None else Rotary(rope_base)
    out, entropy = attn(q[:, :, rows], k, v, alibi_slopes=slopes, rope=rope, return_entropy=True, **extras)
    assert entropy is None
    options = {"alibi_slopes": slopes, "rope_base": rope_base, "output_norm": attn.output_norm}
    ref = reference_from_extras(mechanism, q, k, v, extras, **options)[:, :, rows]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TIGHT)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    inputs = (q, k, v, *extras.values())
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    for name, grad, ref_grad in zip(("q", "k", "v", *extras), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TIGHT, msg=lambda m, name=name: f"grad of {name}: {m}")


def assert_decoding_matches_full(
    mechanism: str, attn: AttentionKernel, splits: tuple[int, ...], *, kv_heads: int = 2, position: str = "alibi+rope",
) -> None:
    """A prefill and then new tokens a few or one at a time give the full forward's rows; the cache stays d x d."""
    n, heads, dim = sum(splits), 4, 8
    q, k, v = (t.detach() for t in make_qkv(2, heads, kv_heads, n, head_dim=dim, seed=5))
    extras = {key: t.detach() for key, t in random_extras(mechanism, 2, heads, n, dim, seed=5).items()}
    slopes, rope_base = position_args(position, heads, q.dtype)
    rope = None if rope_base is None else Rotary(rope_base)
    full = attn(q, k, v, alibi_slopes=slopes, rope=rope, **extras)
    ref = reference_from_extras(mechanism, q, k, v, extras, alibi_slopes=slopes, rope_base=rope_base,
                                output_norm=attn.output_norm)
    torch.testing.assert_close(full, ref, **TIGHT)
    cache, start = attn.new_cache(), 0
    for size in splits:
        new = slice(start, start + size)
        part = {key: t[:, :, new] for key, t in extras.items()}
        out = attn.decode(q[:, :, new], k[:, :, new], v[:, :, new], cache, alibi_slopes=slopes, rope=rope, **part)
        torch.testing.assert_close(out, full[:, :, new], **TIGHT)
        start += size
        assert cache.position == start
        assert cache.nbytes == 2 * heads * dim * dim * q.element_size()


def assert_chunk_size_invariant(mechanism: str, chunk_sizes: tuple[int, ...], n: int = 45, **options) -> None:
    """Every chunk size gives the same outputs (float64), with grouped kv heads, ALiBi and RoPE."""
    from transformer_comparison.attention import build_attention

    q, k, v = make_qkv(1, 4, 2, n, seed=7)
    extras = random_extras(mechanism, 1, 4, n, 8, seed=7)
    call = {"alibi_slopes": alibi_slopes(4, dtype=q.dtype), "rope": Rotary(), **extras}
    outs = [build_attention(mechanism, chunk_size=c, **options)(q, k, v, **call) for c in chunk_sizes]
    for chunk, out in zip(chunk_sizes[1:], outs[1:]):
        torch.testing.assert_close(out, outs[0], **TIGHT, msg=lambda m, chunk=chunk: f"chunk_size={chunk}: {m}")


def assert_long_sequence_matches_naive(mechanism: str, attn: AttentionKernel, extras: dict[str, Tensor],
                                       slopes: Tensor | None = None, n: int = 8192) -> None:
    """float32 over n = 8192 tokens (strong decays): finite outputs and gradients, equal to the float64
    recurrence (to 1e-4 of the outputs' scale). Pass attn with output_norm=False: the normalisation
    would amplify rounding wherever an output is near zero, which says nothing about stability."""
    q, k, v = (t.detach().float().requires_grad_() for t in make_qkv(1, 2, 1, n, seed=3))
    extras32 = {key: t.detach().float().requires_grad_() for key, t in extras.items()}
    out = attn(q, k, v, alibi_slopes=None if slopes is None else slopes.float(), rope=Rotary(), **extras32)
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, *extras32.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        ref = reference_from_extras(mechanism, *(t.double() for t in (q, k, v)),
                                    {key: t.double() for key, t in extras32.items()},
                                    alibi_slopes=None if slopes is None else slopes.double(), rope_base=10000.0,
                                    output_norm=attn.output_norm)
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * scale)


def assert_bfloat16_finite(attn: AttentionKernel, mechanism: str) -> None:
    """bf16 in (extras too), bf16 out; outputs and gradients finite, with ALiBi and RoPE both on."""
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(2, 4, 2, 37, head_dim=16))
    extras = {key: t.detach().bfloat16() for key, t in random_extras(mechanism, 2, 4, 37, 16).items()}
    out = attn(q, k, v, alibi_slopes=alibi_slopes(4), rope=Rotary(), **extras)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    cache = attn.new_cache()
    step = attn.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], cache, alibi_slopes=alibi_slopes(4), rope=Rotary(),
                       **{key: t[:, :, :1] for key, t in extras.items()})
    assert step.dtype == torch.bfloat16 and torch.isfinite(step).all()


def assert_saves_linear_memory(attn: AttentionKernel, mechanism: str) -> None:
    """No saved tensor is n x n, and what autograd keeps grows linearly with n (chunk_size 16)."""
    from tests.attention.checks import saved_tensor_sizes

    saved = {}
    for n in (256, 512):
        q, k, v = make_qkv(1, 2, 1, n, head_dim=8)
        extras = random_extras(mechanism, 1, 2, n, 8)
        call = {"alibi_slopes": alibi_slopes(2, dtype=q.dtype), "rope": Rotary(), **extras}
        saved[n] = saved_tensor_sizes(lambda: attn(q, k, v, **call))
        assert max(saved[n]) < n * n / 4
    assert sum(saved[512]) < 2.2 * sum(saved[256])


def assert_empty_inputs_give_empty_outputs(attn: AttentionKernel, mechanism: str) -> None:
    """No queries (and no keys at all) give (B, H, 0, d) outputs that backward accepts."""
    for nk in (0, 5):
        q = torch.randn(1, 4, 0, 8, requires_grad=True)
        k, v = torch.randn(1, 2, nk, 8), torch.randn(1, 2, nk, 8)
        extras = {key: t.detach().float() for key, t in random_extras(mechanism, 1, 4, nk, 8).items()}
        out, entropy = attn(q, k, v, return_entropy=True, **extras)
        assert out.shape == (1, 4, 0, 8) and entropy is None
        out.sum().backward()


def load_fla_naive(relative_path: str):
    """A flash-linear-attention pure-torch reference file (fla/ops/...), loaded on its own: importing
    fla itself needs Triton. pytest.skip when fla-core (or its einops) is not installed."""
    import importlib.util
    import pathlib

    import pytest

    pytest.importorskip("einops")
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed (pip install --no-deps fla-core)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "ops" / relative_path
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
