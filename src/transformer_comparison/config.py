"""The run configuration: a pydantic schema for configs/*.yaml, dotted overrides, load and dump.

    cfg = load_config("configs/config.yaml", ["training.learning_rate=3e-4"], attention_type="local")
    cfg.model.d_model, cfg.attention.local.window, kv_heads_for(cfg), kernel_options_for(cfg)

Sections: model, attention, position, training, data, logging. `attention` and `position` are derived
from the registries: `type` is one of the registered names, and each registered mechanism / encoding
with options has a subsection of its own, whose keys, types, bounds and defaults are its
constructor's (attention.local.window, position.rope.base). Every key has a default, so a config
file may list only what it changes. Every problem, whether in the YAML, an override or a cross-field
rule, raises `UserError` with a one-line message naming the key (`training.learning_rate`), the bad
value and what is allowed. YAML and override parsing live in config_io.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from transformer_comparison import config_io
from transformer_comparison.artifacts.io import write_text_atomic
from transformer_comparison.config_io import user_error
from transformer_comparison.errors import UserError

_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class _Section(BaseModel):
    """A config section: unknown keys are errors, values are not coerced from strings."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)


class ModelConfig(_Section):
    vocab_size: int | None = Field(None, ge=1)  # null: the tokenizer's vocabulary size
    d_model: int = Field(128, ge=1)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(4, ge=1)
    context_length: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    mlp_ratio: float = Field(4.0, gt=0.0)  # MLP hidden width = round(mlp_ratio * d_model)
    short_conv: int = Field(0, ge=0)  # causal depthwise conv of this width over q, k, v (0: none; >= 2)


def _registry_section(name: str, doc: str, names: tuple[str, ...], options: dict[str, type[BaseModel]],
                      extra_fields: dict[str, Any]) -> type[_Section]:
    """A config section with `type` (one of the registered names), shared keys, and one subsection
    per registered entry holding its options (derived from its constructor)."""
    fields: dict[str, Any] = {"type": (Literal[names], names[0]), **extra_fields}  # type: ignore[valid-type]
    for entry, model in options.items():
        fields[entry] = (model, Field(default_factory=model))
    section = create_model(name, __base__=_Section, **fields)
    section.__doc__ = doc
    return section


def _attention_section() -> type[_Section]:
    from transformer_comparison.attention.registry import options_model, registered_names

    ordered = registered_names()  # the first (by display_order) is the default
    return _registry_section(
        "AttentionConfig", "attention: the mechanism (`type`), kv heads, and each mechanism's options.",
        ordered, {n: options_model(n) for n in ordered if options_model(n).model_fields},
        {"num_kv_heads": (int | None, Field(None, ge=1))},  # every mechanism but gqa; null: num_heads
    )


def _position_section() -> type[_Section]:
    from transformer_comparison.position.registry import options_model, registered_names

    ordered = registered_names()  # the first (by display_order) is the default
    with_options = {n: options_model(n) for n in ordered if options_model(n).model_fields}
    return _registry_section("PositionConfig", "position: the encoding (`type`) and each encoding's options.",
                             ordered, with_options, {})


AttentionConfig = _attention_section()
PositionConfig = _position_section()

def _legacy_renames() -> dict[tuple[str, str], tuple[str, str]]:
    """Keys of the attention/position sections before options moved into one subsection per mechanism /
    encoding, that name an option differently: each entry's class declares its own (`legacy_keys`).
    Any other flat key sets that option on every entry that has it (`attention.window=16`)."""
    from transformer_comparison.attention.registry import kernel_class
    from transformer_comparison.attention.registry import registered_names as mechanisms
    from transformer_comparison.position.registry import position_class
    from transformer_comparison.position.registry import registered_names as encodings

    renames = {}
    for section, names, lookup in (("attention", mechanisms(), kernel_class), ("position", encodings(), position_class)):
        for name in names:
            for old, option in getattr(lookup(name), "legacy_keys", {}).items():
                renames[(section, old)] = (name, option)
    return renames


LEGACY_RENAMES = _legacy_renames()
REGISTRY_SECTIONS = {"attention": AttentionConfig, "position": PositionConfig}


class TrainingConfig(_Section):
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    min_learning_rate: float = Field(1e-4, ge=0.0)  # the end of the cosine decay
    max_steps: int | None = Field(2000, ge=1)  # exactly one of max_steps and num_epochs is set
    num_epochs: float | None = Field(None, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: off
    gradient_accumulation_steps: int = Field(1, ge=1)
    eval_interval: int = Field(250, ge=1)
    eval_batches: int | None = Field(20, ge=1)  # null: the whole validation split
    checkpoint_interval: int = Field(500, ge=0)  # 0: only at the end
    seed: int = Field(1337, ge=0, lt=2**32)  # numpy's seed range
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    adamw: Literal["auto", "for_loop", "foreach", "fused"] = "auto"  # torch's AdamW implementation; auto: fused on CUDA
    time_budget_seconds: float | None = Field(None, gt=0.0)
    flop_budget: float | None = Field(None, gt=0.0)  # stop after this many training FLOPs (model estimate)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.fullmatch(value):
            raise ValueError("should be auto, cpu, cuda, cuda:N or mps")
        return value


class DataConfig(_Section):
    dataset: str = Field("python-stdlib", min_length=1)
    tokenizer: Literal["char", "byte", "bpe"] = "char"
    bpe_vocab_size: int = Field(4096, ge=257)  # more than the 256 byte symbols BPE starts from
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    cache_dir: str | None = None  # null: $TCOMPARE_CACHE or ~/.cache/transformer-comparison


class LoggingConfig(_Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online when logged in, else offline
    project: str = "transformer-comparison"
    entity: str | None = None
    log_interval: int = Field(10, ge=1)
    progress: bool = True


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    position: PositionConfig = Field(default_factory=PositionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        problem = _consistency_problem(self)
        if problem:
            raise ValueError(problem)
        return self


def _consistency_problem(cfg: Config) -> str | None:
    """The first cross-field rule the config breaks, as a one-line message, or None."""
    from transformer_comparison.attention.registry import kernel_class
    from transformer_comparison.position.registry import position_class

    m, a, t = cfg.model, cfg.attention, cfg.training
    heads = m.num_heads
    if m.d_model % heads:
        return f"model.d_model={m.d_model} is not divisible by model.num_heads={heads}"
    if m.short_conv == 1:
        return "model.short_conv=1 is a per-channel scale, not a convolution; use 0 (none) or a width >= 2 (e.g. 4)"
    head_dim = m.d_model // heads
    encoding = position_class(cfg.position.type)
    if encoding.needs_even_head_dim and head_dim % 2:
        return (f"model.d_model={m.d_model} / model.num_heads={heads} gives head dimension {head_dim}; "
                f"position.type={cfg.position.type} needs an even head dimension")
    refused = kernel_class(a.type).refused_positions.get(cfg.position.type)
    if refused:
        return f"attention.type={a.type} with position.type={cfg.position.type} is refused: {refused}"
    try:
        kv_heads_for(cfg)
    except ValueError as error:
        return str(error)
    if t.min_learning_rate > t.learning_rate:
        return f"training.min_learning_rate={t.min_learning_rate} must not exceed training.learning_rate={t.learning_rate}"
    if (t.max_steps is None) == (t.num_epochs is None):
        return (f"training.max_steps={t.max_steps} and training.num_epochs={t.num_epochs}: set exactly one of them "
                "(e.g. training.max_steps=null to train by epochs)")
    if cfg.data.tokenizer == "byte" and m.vocab_size is not None and m.vocab_size < 256:
        return f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's 256 symbols; use null or >= 256"
    return None


SECTIONS: dict[str, type[_Section]] = {name: field.annotation for name, field in Config.model_fields.items()}  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Derived values


def kernel_options_for(cfg: Config) -> dict[str, Any]:
    """The construction options of cfg.attention.type's kernel: its subsection of `attention` (none: {})."""
    section = getattr(cfg.attention, cfg.attention.type, None)
    return section.model_dump() if isinstance(section, BaseModel) else {}


def position_options_for(cfg: Config) -> dict[str, Any]:
    """The options of cfg.position.type's encoding: its subsection of `position` (none: {})."""
    section = getattr(cfg.position, cfg.position.type, None)
    return section.model_dump() if isinstance(section, BaseModel) else {}


def kv_heads_for(cfg: Config) -> int:
    """Key/value heads of the model, by the mechanism's own policy (`AttentionKernel.kv_heads`)."""
    from transformer_comparison.attention.registry import build_attention

    kernel = build_attention(cfg.attention.type, **kernel_options_for(cfg))
    return kernel.kv_heads(cfg.model.num_heads, cfg.attention.num_kv_heads)


# ---------------------------------------------------------------------------------------------
# Public API


def _sections() -> dict[str, type[BaseModel]]:
    return SECTIONS  # type: ignore[return-value]


def validate_config(raw: dict[str, Any]) -> Config:
    """Build a Config from a plain dict, raising UserError (one line) on any problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise user_error(error, _sections()) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.key=value` (or `section.entry.key=value`) in a raw config dict."""
    config_io.apply_override(raw, override, _sections(), LEGACY_RENAMES)


def _override_value(raw_overrides: Iterable[str], key: str) -> str | None:
    """The last value an override list gives `key` (e.g. "attention.type"), or None."""
    found = None
    for override in raw_overrides:
        dotted, sep, text = override.partition("=")
        if sep and dotted.strip() == key:
            found = text.strip()
    return found


def load_config(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    attention_type: str | None = None,
    position_embedding: str | None = None,
) -> Config:
    """Read a YAML config (None: the defaults), apply `section.key=value` overrides, then the
    attention/position choices (which win over the file; an override that contradicts them is an
    error), and validate."""
    overrides = list(overrides)
    for flag, key, chosen in (("--attention_type", "attention.type", attention_type),
                              ("--position_embedding", "position.type", position_embedding)):
        given = _override_value(overrides, key)
        if chosen is not None and given is not None and given != chosen:
            raise UserError(f"{flag} {chosen} contradicts the override {key}={given}; give one of them")
    raw = config_io.read_yaml(Path(path).expanduser(), _sections(), LEGACY_RENAMES) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    if attention_type is not None:
        apply_override(raw, f"attention.type={attention_type}")
    if position_embedding is not None:
        apply_override(raw, f"position.type={position_embedding}")
    return validate_config(raw)


def config_to_yaml(cfg: Config) -> str:
    """Every key of the config, section by section, as YAML that load_config reads back."""
    return yaml.safe_dump(cfg.model_dump(mode="python"), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, config_to_yaml(cfg))


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of a validated config with more `section.key=value` overrides applied."""
    raw = cfg.model_dump(mode="python")
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw)
