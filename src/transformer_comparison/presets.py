"""Named sets of config overrides for `tcompare compare --preset NAME`.

A preset is applied on top of `--config` (and before the user's own `section.key=value`
overrides, which win). Its `note` is stored in comparison.json and shown at the top of the report.
Its `sweeps` are default `--sweep` axes: a user's --sweep or override of the same key replaces one
(`--sweep training.learning_rate=1e-3`, or `training.learning_rate=1e-3`, trains that rate only).

- quick: no sweep (its point is the whole grid in minutes; a learning-rate sweep would triple that).
- nanogpt-cpu: `training.learning_rate=5e-4,1e-3,2e-3`, the recipe's 1e-3 and a factor of two either
  side, so that each mechanism gets its own learning rate (efficient mechanisms train in a narrower
  window than softmax attention; zoology sweeps four rates per cell and reports the best).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer_comparison.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: tuple[str, ...]
    note: str | None = None  # shown at the top of the report
    scale: str = "full"  # "smoke" for presets whose ranking is only indicative
    jobs: int | None = None  # runs at once when --jobs is not given (None: 1)
    sweeps: tuple[str, ...] = ()  # default --sweep axes, "KEY=V1,V2,..."


QUICK = Preset(
    name="quick",
    description="every registered mechanism x encoding at smoke scale on the embedded python-stdlib corpus (2 runs at a time)",
    overrides=(
        "data.dataset=python-stdlib",
        "data.tokenizer=char",
        "model.vocab_size=null",
        "model.d_model=64",
        "model.num_heads=4",
        "model.num_layers=2",
        "model.context_length=128",
        "model.dropout=0.0",
        "attention.window=32",
        "attention.top_k=16",
        "attention.block_size=64",
        "attention.chunk_size=64",
        "attention.num_kv_heads=null",
        "attention.gqa_kv_heads=null",
        "training.batch_size=16",
        "training.learning_rate=2e-3",
        "training.min_learning_rate=2e-4",
        "training.max_steps=500",
        "training.num_epochs=null",
        "training.time_budget_seconds=null",
        "training.warmup_steps=50",
        "training.gradient_accumulation_steps=1",
        "training.eval_interval=50",
        "training.eval_batches=16",
        "training.checkpoint_interval=250",
        "training.device=cpu",
        "training.dtype=float32",
        "training.compile=false",
        "logging.wandb=disabled",
        "logging.log_interval=25",
        "logging.progress=false",
    ),
    note=(
        "Smoke-scale comparison (preset `quick`): tiny models trained for a few hundred steps on CPU. "
        "Differences smaller than the seed-to-seed spread are noise, and the ranking says how the mechanisms "
        "start learning, not how they compare at scale; use `--preset nanogpt-cpu`, more seeds or a bigger "
        "config for conclusions."
    ),
    scale="smoke",
    # Two single-threaded runs at once: on 2 cores as fast as one run with 2 threads, and far
    # faster on a busy machine, where two OpenMP threads wait on each other (5-10x slower steps).
    jobs=2,
)

NANOGPT_CPU = Preset(
    name="nanogpt-cpu",
    description="nanoGPT's CPU recipe (configs/nanogpt_cpu.yaml) for every cell: 4x4x128, ctx 64, 2000 steps, tiny Shakespeare",
    overrides=(
        "data.dataset=tinyshakespeare",
        "data.tokenizer=char",
        "data.val_fraction=0.1",
        "model.vocab_size=null",
        "model.d_model=128",
        "model.num_heads=4",
        "model.num_layers=4",
        "model.context_length=64",
        "model.dropout=0.0",
        "model.bias=false",
        "training.batch_size=12",
        "training.learning_rate=1e-3",
        "training.min_learning_rate=1e-4",
        "training.max_steps=2000",
        "training.num_epochs=null",
        "training.time_budget_seconds=null",
        "training.warmup_steps=100",
        "training.weight_decay=0.1",
        "training.beta1=0.9",
        "training.beta2=0.99",
        "training.grad_clip=1.0",
        "training.gradient_accumulation_steps=1",
        "training.eval_interval=250",
        "training.eval_batches=null",
        "training.device=cpu",
        "training.dtype=float32",
        "logging.progress=false",
    ),
    note=(
        "Preset `nanogpt-cpu`: nanoGPT's CPU recipe (4 layers, 4 heads, d_model 128, context 64, batch 12, "
        "2000 steps on character-level tiny Shakespeare) for every cell, evaluated on the whole validation split."
    ),
    sweeps=("training.learning_rate=5e-4,1e-3,2e-3",),
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (QUICK, NANOGPT_CPU)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
