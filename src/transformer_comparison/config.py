"""The run configuration: a pydantic schema for configs/*.yaml, dotted overrides, load and dump.

    cfg = load_config("configs/config.yaml", ["training.learning_rate=3e-4"], attention_type="local")
    cfg.model.d_model, cfg.attention.window, kv_heads_for(cfg), kernel_options_for(cfg)

Sections: model, attention, position, training, data, logging. Every key has a default (the values
in configs/config.yaml), so a config file may list only what it changes. Every problem, whether in
the YAML, an override or a cross-field rule, raises `UserError` with a one-line message naming the
key (`training.learning_rate`), the bad value and what is allowed.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transformer_comparison.errors import UserError

# The names in attention/__init__.py and position/__init__.py (tests check they agree); kept here so
# that reading a config does not import torch or the kernels.
ATTENTION_NAMES: tuple[str, ...] = ("dot_product", "linear", "sparse", "local", "gqa", "flash")
POSITION_NAMES: tuple[str, ...] = ("sinusoidal", "rope", "alibi")

AttentionName = Literal["dot_product", "linear", "sparse", "local", "gqa", "flash"]
PositionName = Literal["sinusoidal", "rope", "alibi"]

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


class AttentionConfig(_Section):
    type: AttentionName = "dot_product"
    window: int = Field(32, ge=1)  # local: keys each query sees, itself included
    top_k: int = Field(16, ge=1)  # sparse: keys kept per query
    block_size: int = Field(64, ge=1)  # flash: query/key tile size
    use_sdpa: bool = False  # flash: torch's fused SDPA where it is the same maths (no entropy, no n x n mask)
    chunk_size: int = Field(64, ge=1)  # linear: chunk length of the causal scan
    feature_map: Literal["elu"] = "elu"  # linear: phi(x) = elu(x) + 1
    num_kv_heads: int | None = Field(None, ge=1)  # every mechanism but gqa; null: num_heads
    gqa_kv_heads: int | None = Field(None, ge=1)  # gqa; null: the largest divisor of num_heads <= num_heads // 2


class PositionConfig(_Section):
    type: PositionName = "sinusoidal"
    rope_base: float = Field(10000.0, gt=0.0)


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
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    time_budget_seconds: float | None = Field(None, gt=0.0)

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
    m, a, t = cfg.model, cfg.attention, cfg.training
    heads = m.num_heads
    if m.d_model % heads:
        return f"model.d_model={m.d_model} is not divisible by model.num_heads={heads}"
    head_dim = m.d_model // heads
    if cfg.position.type == "rope" and head_dim % 2:
        return (f"model.d_model={m.d_model} / model.num_heads={heads} gives head dimension {head_dim}; "
                "position.type=rope needs an even head dimension")
    if a.num_kv_heads is not None and (a.num_kv_heads > heads or heads % a.num_kv_heads):
        return f"attention.num_kv_heads={a.num_kv_heads} must divide model.num_heads={heads}; allowed: {_divisors(heads)}"
    if a.gqa_kv_heads is not None and (a.gqa_kv_heads >= heads or heads % a.gqa_kv_heads):
        allowed = _divisors(heads)[:-1] or "none (gqa needs model.num_heads >= 2)"
        return f"attention.gqa_kv_heads={a.gqa_kv_heads} must divide model.num_heads={heads} and be smaller; allowed: {allowed}"
    if a.type == "gqa" and heads < 2:
        return "attention.type=gqa needs model.num_heads >= 2 (fewer kv heads than query heads)"
    if t.min_learning_rate > t.learning_rate:
        return f"training.min_learning_rate={t.min_learning_rate} must not exceed training.learning_rate={t.learning_rate}"
    if (t.max_steps is None) == (t.num_epochs is None):
        return (f"training.max_steps={t.max_steps} and training.num_epochs={t.num_epochs}: set exactly one of them "
                "(e.g. training.max_steps=null to train by epochs)")
    if cfg.data.tokenizer == "byte" and m.vocab_size is not None and m.vocab_size < 256:
        return f"model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's 256 symbols; use null or >= 256"
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SECTIONS: dict[str, type[_Section]] = {name: field.annotation for name, field in Config.model_fields.items()}  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Derived values


def kv_heads_for(cfg: Config) -> int:
    """Key/value heads of the model: gqa_kv_heads for gqa, else num_kv_heads (null: num_heads)."""
    heads = cfg.model.num_heads
    if cfg.attention.type == "gqa":
        if cfg.attention.gqa_kv_heads is not None:
            return cfg.attention.gqa_kv_heads
        return max(d for d in _divisors(heads) if d <= heads // 2)
    return cfg.attention.num_kv_heads or heads


def kernel_options_for(cfg: Config) -> dict[str, Any]:
    """The construction options of cfg.attention.type's kernel, taken from the attention section.

    An option the kernel has but the config does not (linear eps) keeps the kernel's default.
    """
    import transformer_comparison.attention  # noqa: F401  (registers the kernels)
    from transformer_comparison.attention.registry import kernel_options

    section = cfg.attention.model_dump()
    return {name: section[name] for name in kernel_options(cfg.attention.type) if name in section}


# ---------------------------------------------------------------------------------------------
# YAML


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 (no dot) as a float, as YAML 1.2 and Python do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"{source} is not valid YAML: {detail}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    data = _parse_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# Overrides


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.key=value` in the raw config dict; the value is read as a YAML scalar."""
    dotted, sep, text = override.partition("=")
    section_name, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        raise UserError(f"override {override!r} should look like section.key=value, e.g. training.learning_rate=3e-4")
    section = SECTIONS.get(section_name)
    if section is None:
        raise UserError(f"unknown config section {section_name!r} in override {override!r}; valid sections: {', '.join(SECTIONS)}")
    if key not in section.model_fields:
        raise UserError(f"unknown key {section_name}.{key} in override {override!r}; valid keys of {section_name}: "
                        f"{', '.join(section.model_fields)}")
    target = raw.setdefault(section_name, {})
    if not isinstance(target, dict):
        raise UserError(f"{section_name} should be a mapping of keys, got {target!r}")
    target[key] = _override_value(section, key, text.strip(), override)


def _override_value(section: type[_Section], key: str, text: str, override: str) -> Any:
    value = _parse_yaml(text, f"override {override!r}")
    # A string-valued key keeps what was typed (logging.project=123, data.dataset=on).
    if value is not None and not isinstance(value, str) and _accepts_str(section.model_fields[key].annotation):
        return text
    return value


def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    return bool(args) and any(arg is str or isinstance(arg, str) or _accepts_str(arg) for arg in args)


# ---------------------------------------------------------------------------------------------
# Errors


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as one line: key path, bad value, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    path = ".".join(loc)
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown config section {loc[0]!r}; valid sections: {', '.join(SECTIONS)}"
        section = SECTIONS.get(loc[0])
        valid = ", ".join(section.model_fields) if section else ""
        return f"unknown key {path}; valid keys of {loc[0]}: {valid}"
    if kind == "model_type" and len(loc) == 1:
        return f"{path} should be a mapping of keys ({', '.join(SECTIONS[loc[0]].model_fields)}), got {_short(value)}"
    msg = msg.removeprefix("Value error, ")
    if not path:  # a cross-field rule: the message names its keys
        return msg
    if msg.startswith("Input should be "):
        msg = "should be " + msg.removeprefix("Input should be ")
    elif not msg.startswith("should "):
        msg = f"is invalid: {msg}"
    return f"{path}={_short(value)} {msg}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _user_error(error: ValidationError) -> UserError:
    errors = error.errors(include_url=False)
    message = _describe(errors[0])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return UserError(message)


# ---------------------------------------------------------------------------------------------
# Public API


def validate_config(raw: dict[str, Any]) -> Config:
    """Build a Config from a plain dict, raising UserError (one line) on any problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise _user_error(error) from None


def load_config(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    attention_type: str | None = None,
    position_embedding: str | None = None,
) -> Config:
    """Read a YAML config (None: the defaults), apply `section.key=value` overrides, then the
    attention/position choices (which win over both), and validate."""
    raw = _read_yaml(Path(path).expanduser()) if path is not None else {}
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
    Path(path).write_text(config_to_yaml(cfg), encoding="utf-8")


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of a validated config with more `section.key=value` overrides applied."""
    raw = cfg.model_dump(mode="python")
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw)
