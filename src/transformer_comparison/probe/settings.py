"""What a probe sweep is: `ProbeSettings` (the grid, the task, the training budget), its presets,
and the runs it expands to, each with its resolved config.

Layering, lowest first: the built-in defaults (the default sweep), then `--preset`, then the
explicit command-line flags. The model config is `--config` (or the built-in config defaults) with
PROBE_OVERRIDES on top, then the user's trailing `section.key=value` overrides (which win), then
per run attention.type, position.type, model.d_model and model.context_length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transformer_comparison.config import (
    Config,
    kernel_options_for,
    load_config,
    with_overrides,
)
from transformer_comparison.errors import UserError
from transformer_comparison.probe.mqar import DEFAULT_ALPHA, check_task
from transformer_comparison.probe.trainer import Budget

# The zoology setting: two layers; the probe's own defaults for what the run config leaves open.
PROBE_OVERRIDES: tuple[str, ...] = ("model.num_layers=2", "model.num_heads=2", "model.dropout=0.0")
DEFAULT_VOCAB = 256  # > every default length; zoology uses 8192, which only costs more here
# Keys each run sets itself: overriding them is an error that names the flag to use instead.
PER_RUN_KEYS: dict[str, str] = {
    "attention.type": "--attention_types",
    "position.type": "--position_embeddings",
    "model.d_model": "--d_models",
    "model.context_length": "--seq_lens",
    "model.vocab_size": "--vocab_size",
    "training.learning_rate": "--learning_rates",
    "training.max_steps": "--max_steps",
    "training.batch_size": "--batch_size",
    "training.warmup_steps": "--warmup_steps",
    "training.eval_interval": "--eval_interval",
}


@dataclass(frozen=True)
class ProbeSettings:
    """One MQAR sweep. Empty mechanism/encoding tuples mean every registered one."""

    attention_types: tuple[str, ...] = ()
    position_embeddings: tuple[str, ...] = ("rope",)
    seq_lens: tuple[int, ...] = (64,)
    kv_pairs: tuple[int, ...] = (4, 16)
    d_models: tuple[int, ...] = (32, 64)
    learning_rates: tuple[float, ...] = (3e-3, 1e-2)
    seeds: int = 1
    test_seq_lens: tuple[int, ...] = ()
    vocab_size: int | None = None  # None: DEFAULT_VOCAB for generated data, max id + 1 with --data
    alpha: float = DEFAULT_ALPHA
    random_non_queries: bool = True
    mlp: bool = False
    num_train: int = 8192
    num_test: int = 1024
    budget: Budget = field(default_factory=lambda: Budget(batch_size=64, max_steps=600, warmup_steps=50,
                                                          eval_interval=50, eval_examples=256))
    jobs: int | None = None  # None: one per CPU core (one on CUDA)
    data_dir: Path | None = None  # read DIR/train.npz, DIR/test.npz instead of generating
    config_path: Path | None = None
    overrides: tuple[str, ...] = ()
    preset: str | None = None

    @property
    def generated_vocab(self) -> int:
        """The vocabulary of generated examples."""
        return self.vocab_size or DEFAULT_VOCAB

    def fingerprint(self) -> dict[str, Any]:
        """What makes two sweeps' rows comparable (everything but the grid lists and the parallelism)."""
        grid = {"attention_types", "position_embeddings", "seq_lens", "kv_pairs", "d_models", "learning_rates",
                "seeds", "test_seq_lens", "jobs", "config_path", "overrides", "preset"}
        values = {k: v for k, v in asdict(self).items() if k not in grid}
        values["data_dir"] = None if self.data_dir is None else str(self.data_dir.resolve())
        values["config"] = base_config(self).model_dump(mode="json", exclude={"attention": {"type"}, "position": {"type"}})
        return json.loads(json.dumps(values, default=str))


def quick_preset() -> dict[str, Any]:
    """`--preset quick`: every registered mechanism once, at the densest setting of L = 64 (D = 16, 4D = L),
    about 2-3 minutes on 2 idle CPU cores; softmax attention passes 0.99 within its budget there."""
    return {
        "attention_types": (), "position_embeddings": ("rope",), "seq_lens": (64,), "kv_pairs": (16,), "d_models": (64,),
        "learning_rates": (1e-2,), "seeds": 1, "test_seq_lens": (), "num_train": 4096, "num_test": 256,
        "budget": Budget(batch_size=64, max_steps=450, warmup_steps=50, eval_interval=25, eval_examples=256),
    }


PRESETS = {"quick": quick_preset}


def fingerprint_hash(settings: ProbeSettings) -> str:
    return hashlib.sha256(json.dumps(settings.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# the model config of each run


def base_config(settings: ProbeSettings) -> Config:
    """--config plus the probe's defaults and the user's overrides (per-run keys refused)."""
    for override in settings.overrides:
        key = override.partition("=")[0].strip()
        if key in PER_RUN_KEYS:
            raise UserError(f"{key} is set per run by the probe; use {PER_RUN_KEYS[key]} instead of the override {override!r}")
    return load_config(settings.config_path, (*PROBE_OVERRIDES, *settings.overrides))


def run_config(base: Config, attention_type: str, position_embedding: str, d_model: int, context_length: int) -> Config:
    """The config of one run: the base with its mechanism, encoding, width and length."""
    return with_overrides(base, [
        f"attention.type={attention_type}", f"position.type={position_embedding}",
        f"model.d_model={d_model}", f"model.context_length={context_length}",
    ])


def window_of(base: Config, attention_type: str) -> int | None:
    """The mechanism's `window` option (keys a query sees) in the config, if it has one."""
    options = kernel_options_for(base.model_copy(update={"attention": base.attention.model_copy(update={"type": attention_type})}))
    window = options.get("window")
    return int(window) if window is not None else None


# ----------------------------------------------------------------------------------------------
# checks of the whole sweep, before anything runs


def check_settings(settings: ProbeSettings, attention_names: tuple[str, ...], position_names: tuple[str, ...]) -> None:
    """Raise UserError (one line) for any value the sweep cannot use."""
    for name in settings.attention_types:
        if name not in attention_names:
            raise UserError(f"unknown attention mechanism {name!r}; registered: {', '.join(attention_names)}")
    for name in settings.position_embeddings:
        if name not in position_names:
            raise UserError(f"unknown position embedding {name!r}; registered: {', '.join(position_names)}")
    for label, values in (("--d_models", settings.d_models), ("--seeds", (settings.seeds,)),
                          ("--num_train", (settings.num_train,)), ("--num_test", (settings.num_test,))):
        bad = [v for v in values if v < 1]
        if bad:
            raise UserError(f"{label} must be >= 1; got {bad[0]}")
    bad_lr = [lr for lr in settings.learning_rates if not lr > 0]
    if bad_lr:
        raise UserError(f"--learning_rates must be > 0; got {bad_lr[0]}")
    b = settings.budget
    for label, value in (("--batch_size", b.batch_size), ("--max_steps", b.max_steps),
                         ("--eval_interval", b.eval_interval), ("--eval_examples", b.eval_examples)):
        if value < 1:
            raise UserError(f"{label} must be >= 1; got {value}")
    if b.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0; got {b.warmup_steps}")
    if not 0 < b.target_accuracy <= 1:
        raise UserError(f"--target_accuracy must be in (0, 1]; got {b.target_accuracy}")
    if settings.jobs is not None and settings.jobs < 1:
        raise UserError(f"--jobs must be >= 1; got {settings.jobs}")
    if settings.data_dir is not None:
        if settings.test_seq_lens:
            raise UserError("--test_seq_lens needs generated data; with --data the test length is test.npz's")
        return
    for seq_len in settings.seq_lens:
        for pairs in settings.kv_pairs:
            check_task(settings.generated_vocab, seq_len, pairs, settings.alpha)
    for test_len in settings.test_seq_lens:
        if test_len <= min(settings.seq_lens):
            raise UserError(f"--test_seq_lens {test_len} is not longer than every training length "
                            f"{min(settings.seq_lens)}: it evaluates at lengths beyond training")
        for pairs in settings.kv_pairs:
            check_task(settings.generated_vocab, test_len, pairs, settings.alpha)


def with_preset(settings: ProbeSettings, name: str | None) -> ProbeSettings:
    """The settings with the named preset's values applied."""
    if name is None:
        return settings
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return replace(settings, preset=name, **PRESETS[name]())
