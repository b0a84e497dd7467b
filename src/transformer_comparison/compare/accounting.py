"""Parameter and compute accounting of a run config, without training or allocating it.

    count = parameter_count(cfg)                  # ParameterCount(embedding, non_embedding)
    flops = training_flops_per_token(cfg)         # forward + backward FLOPs per training token
    ratio = match_mlp_ratio(cfg, target)          # model.mlp_ratio giving `target` non-embedding parameters

Parameters are counted on the model itself, built on PyTorch's meta device (shapes only, no memory),
so a mechanism's own projections (gates, decays) are counted. The embedding is the token embedding,
tied to the output head; everything else is non-embedding and does not depend on the vocabulary.

Training FLOPs per token follow Kaplan et al. (2020), 6 N for the weights (N non-embedding: the
multiply-adds of the forward pass, twice that backward), plus 3x the forward FLOPs of the attention
operation itself from the mechanism's own model (`AttentionKernel.flops`, causal, over one
context window, per layer). So linear attention's term grows with n, softmax attention's with n^2.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer_comparison.config import Config, kernel_options_for, with_overrides
from transformer_comparison.errors import UserError

MLP_RATIO_KEY = "model.mlp_ratio"
MATCH_TOLERANCE = 0.01  # --match params: within 1% of dot_product's non-embedding parameters
FLAG_TOLERANCE = 0.10  # the report flags cells more than 10% away


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    non_embedding: int

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


def reference_mechanism() -> str:
    """The mechanism parameter counts are compared with: the registry's baseline (dot_product)."""
    from transformer_comparison.attention.registry import baseline_name

    return baseline_name()


def parameter_count(cfg: Config, vocab_size: int = 1) -> ParameterCount:
    """The model's parameters, split into the (tied) token embedding and the rest."""
    from transformer_comparison.resources import meta_model

    with meta_model(cfg, vocab_size) as model:
        total = sum(p.numel() for p in model.parameters())
        embedding = model.token_embedding.weight.numel()
    return ParameterCount(embedding, total - embedding)


def attention_forward_flops_per_token(cfg: Config) -> float:
    """The attention operation's forward FLOPs per token (all layers), from the mechanism's FLOP model."""
    from transformer_comparison.attention.registry import build_attention

    kernel = build_attention(cfg.attention.type, **kernel_options_for(cfg))
    n, heads = cfg.model.context_length, cfg.model.num_heads
    per_window = kernel.flops(batch=1, heads=heads, nq=n, nk=n, head_dim=cfg.model.d_model // heads, causal=True)
    return cfg.model.num_layers * per_window / n


def training_flops_per_token(cfg: Config, non_embedding: int | None = None) -> float:
    """6 N (weights, forward and backward) + 3 x the attention operation's forward FLOPs, per token."""
    if non_embedding is None:
        non_embedding = parameter_count(cfg).non_embedding
    return 6.0 * non_embedding + 3.0 * attention_forward_flops_per_token(cfg)


def tokens_per_step(cfg: Config) -> int:
    t = cfg.training
    return t.batch_size * t.gradient_accumulation_steps * cfg.model.context_length


def flop_budget(cfg: Config) -> float | None:
    return getattr(cfg.training, "flop_budget", None)


def steps_for_flop_budget(cfg: Config, flops_per_token: float) -> int:
    """The optimizer steps a FLOP budget buys this config (at least one)."""
    budget = flop_budget(cfg)
    assert budget is not None
    steps = int(budget // (flops_per_token * tokens_per_step(cfg)))
    if steps < 1:
        raise UserError(f"training.flop_budget={budget:g} is less than one step of {cfg.attention.type} "
                        f"({flops_per_token * tokens_per_step(cfg):.3g} FLOPs); raise it")
    return steps


def reference_config(cfg: Config) -> Config:
    """The same config with dot_product attention: what a mechanism's parameter count is held against."""
    if cfg.attention.type == reference_mechanism():
        return cfg
    return with_overrides(cfg, [f"attention.type={reference_mechanism()}"])


def has_mlp_ratio(cfg: Config) -> bool:
    return "mlp_ratio" in type(cfg.model).model_fields


def match_mlp_ratio(cfg: Config, target: int) -> float | None:
    """The model.mlp_ratio that brings the non-embedding parameters within 1% of `target` (None:
    already within 1%). The count is linear in the MLP's hidden width h = mlp_ratio x d_model, so two
    counts give its slope and the closest whole width; the result is checked by counting again."""
    if not has_mlp_ratio(cfg):
        raise UserError("--match params needs the model.mlp_ratio config key, which this version of the config lacks")

    def count(hidden: int) -> int:
        return parameter_count(with_overrides(cfg, [f"{MLP_RATIO_KEY}={hidden / d_model!r}"])).non_embedding

    if abs(parameter_count(cfg).non_embedding - target) <= MATCH_TOLERANCE * target:
        return None
    d_model = cfg.model.d_model
    hidden = max(1, round(cfg.model.mlp_ratio * d_model))
    base = count(hidden)
    per_unit = count(hidden + 1) - base
    matched = max(1, hidden + round((target - base) / per_unit))
    got = count(matched)
    if abs(got - target) > MATCH_TOLERANCE * target:
        raise UserError(f"--match params: the closest MLP width ({matched}) gives {cfg.attention.type} {got:,} "
                        f"non-embedding parameters, more than 1% from dot_product's {target:,}")
    return matched / d_model
