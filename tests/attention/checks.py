"""Checks shared by the kernel tests: agreement with the dense reference, K/V copies, saved memory."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.attention.conftest import make_qkv
from tests.attention.reference import reference_attention
from transformer_comparison.attention import AttentionKernel
from transformer_comparison.position import Rotary, alibi_slopes

TIGHT = {"rtol": 1e-9, "atol": 1e-10}
POSITIONS = ["none", "alibi", "rope", "alibi+rope"]


def assert_matches_reference(
    mechanism: str, attn: AttentionKernel, q, k, v, *, causal: bool = True, position: str = "none",
    slopes: torch.Tensor | None = None, rope_base: float | None = None, last: int | None = None,
    **reference_options,
) -> None:
    """Output, entropy and the gradients of q, k, v (through fixed random output weights) equal the reference.

    `position` is one of POSITIONS: ALiBi slopes and/or RoPE (base 10000) given to both sides; or pass
    `slopes` / `rope_base` directly. `last`: the kernel gets only the last `last` queries (decoding from
    a cache, nq < nk) and must give the last rows of the full reference.
    """
    heads = q.shape[1]
    if "alibi" in position:
        slopes = alibi_slopes(heads, dtype=q.dtype)
    if "rope" in position:
        rope_base = 10000.0
    rope = None if rope_base is None else Rotary(rope_base)
    rows = slice(-last if last else 0, None)
    out, entropy = attn(q[:, :, rows], k, v, causal=causal, alibi_slopes=slopes, rope=rope, return_entropy=True)
    ref_out, ref_entropy = reference_attention(
        mechanism, q, k, v, causal=causal, alibi_slopes=slopes, rope_base=rope_base, **reference_options
    )
    ref_out, ref_entropy = ref_out[:, :, rows], ref_entropy[:, :, rows]
    assert out.shape == ref_out.shape and entropy.shape == ref_out.shape[:3]
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(entropy, ref_entropy, **TIGHT)
    weights = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=ref_out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * weights).sum(), (q, k, v))
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TIGHT, msg=lambda m, name=name: f"grad of {name}: {m}")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces while active, views left
    out: they allocate nothing (torch 2.5 dispatches a whole-tensor slice that 2.13 elides)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
        return out


def assert_no_repeated_kv(attn: AttentionKernel, nk: int = 64) -> None:
    """Decoding one query of 8 heads over one kv head: no op may build a (heads, nk, d) K or V copy."""
    q = torch.randn(1, 8, 1, 16, requires_grad=True)
    k = torch.randn(1, 1, nk, 16, requires_grad=True)
    v = torch.randn(1, 1, nk, 16, requires_grad=True)
    with LargestTensor() as probe:
        out = attn(q, k, v, alibi_slopes=alibi_slopes(8), rope=Rotary(), return_entropy=True)[0]
        torch.autograd.grad(out.square().sum(), (q, k, v))
    assert probe.numel < 8 * nk * 16 / 2, f"an intermediate of {probe.numel} elements: K/V repeated per query head?"


def saved_bytes(attn: AttentionKernel, n: int) -> int:
    """Bytes autograd keeps for backward beyond q, k, v themselves."""
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(q, k, v)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    return sum(size for pointer, size in storages.items() if pointer not in inputs)


def saved_tensor_sizes(fn) -> list[int]:
    """numel of every tensor autograd saves for backward while running fn()."""
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def assert_bfloat16_gives_finite_outputs_and_gradients(attn: AttentionKernel, causal: bool) -> None:
    """bf16 in, bf16 out; output, entropy and gradients finite, with ALiBi and RoPE both on."""
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(2, 4, 2, 37, head_dim=16))
    out, entropy = attn(q, k, v, causal=causal, alibi_slopes=alibi_slopes(4), rope=Rotary(), return_entropy=True)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(entropy).all()
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def assert_entropy_needs_no_gradient(attn: AttentionKernel) -> None:
    q, k, v = make_qkv(1, 2, 2, 10)
    _, entropy = attn(q, k, v, return_entropy=True)
    assert not entropy.requires_grad


def assert_no_queries_give_empty_results(attn: AttentionKernel, nk: int) -> None:
    q = torch.randn(1, 4, 0, 8, requires_grad=True)
    k, v = torch.randn(1, 2, nk, 8), torch.randn(1, 2, nk, 8)
    out, entropy = attn(q, k, v, return_entropy=True)
    assert out.shape == (1, 4, 0, 8) and entropy.shape == (1, 4, 0)
    out.sum().backward()


def kernel_extras(attn: AttentionKernel, batch: int, heads: int, head_dim: int, n: int, dtype: torch.dtype, seed: int = 3) -> dict:
    """The mechanism's extra inputs for n tokens, from its own `layer_inputs` module on random x."""
    torch.manual_seed(seed)
    module = attn.layer_inputs(heads * head_dim, heads, head_dim)
    if module is None:
        return {}
    x = torch.randn(batch, n, heads * head_dim, dtype=torch.float64).to(dtype)
    return dict(module.to(dtype)(x))
