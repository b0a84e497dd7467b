"""runtime.make_adamw: the AdamW implementation `training.adamw` names, and what each one computes."""

from __future__ import annotations

import pytest
import torch

from transformer_comparison.config import validate_config
from transformer_comparison.errors import UserError
from transformer_comparison.model import GPT, GPTConfig
from transformer_comparison.runtime import make_adamw

CPU = torch.device("cpu")


def train_losses(adamw: str, steps: int = 8) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and final parameters of a small GPT trained on fixed tokens with one AdamW kind."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, context_length=16, d_model=32, num_heads=2, num_layers=2))
    cfg = validate_config({"training": {"adamw": adamw}})
    optimizer = make_adamw(model, cfg, 1e-2, CPU)
    tokens = torch.randint(0, 17, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(tokens, tokens)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_auto_is_the_per_parameter_loop_on_cpu_with_decay_on_matrices_only() -> None:
    model = GPT(GPTConfig(vocab_size=17, context_length=16, d_model=32, num_heads=2, num_layers=1))
    optimizer = make_adamw(model, validate_config({"training": {"weight_decay": 0.1}}), 3e-4, CPU)
    assert not optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert decayed["lr"] == 3e-4


def test_foreach_computes_the_same_bits_as_the_loop_and_fused_rounds_differently() -> None:
    loop_losses, loop_params = train_losses("for_loop")
    assert train_losses("auto")[0] == loop_losses  # auto is the loop on CPU
    foreach_losses, foreach_params = train_losses("foreach")
    assert foreach_losses == loop_losses
    assert all(torch.equal(a, b) for a, b in zip(foreach_params, loop_params))
    fused_losses, fused_params = train_losses("fused")
    assert fused_losses == train_losses("fused")[0]  # deterministic: the same seed, the same losses
    assert any(not torch.equal(a, b) for a, b in zip(fused_params, loop_params))  # its own rounding...
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(fused_params, loop_params))  # ...of the same update


def test_an_implementation_the_device_lacks_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch refuses fused AdamW on devices without the kernel (none of them is here, so torch's refusal is
    stood in for); the user gets one line naming the choices."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices: "
                           "['mps', 'cuda', 'xpu', 'hpu', 'cpu'] but torch.float32 and npu\nmore")
    monkeypatch.setattr(torch.optim, "AdamW", refuse)
    model = GPT(GPTConfig(vocab_size=17, context_length=16, d_model=32, num_heads=2, num_layers=1))
    with pytest.raises(UserError, match=r"training.adamw=fused is not available on cpu \(`fused=True` requires.*\); "
                                        r"valid: auto, for_loop, foreach, fused$"):
        make_adamw(model, validate_config({"training": {"adamw": "fused"}}), 1e-3, CPU)


def test_an_unknown_implementation_is_refused_by_the_config() -> None:
    with pytest.raises(UserError, match="adamw"):
        validate_config({"training": {"adamw": "lion"}})
