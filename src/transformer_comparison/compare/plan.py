"""The plan of a comparison: its cells, each with its config, validated before anything is written.

    plan = make_plan(args)        # mechanisms x encodings x swept values x seeds, or a one-line UserError

Every cell gets the same resolved config (--config, the preset, the user's overrides) except
attention.type, position.type, training.seed and the swept keys, plus what compare itself adjusts
per cell: model.mlp_ratio under --match params, training.max_steps under a FLOP budget. A
mechanism x encoding the mechanism refuses (`refused_positions`) is skipped, with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from transformer_comparison.artifacts.comparison import CellEntry, Grid, Scalar, SkippedCell
from transformer_comparison.attention.registry import kernel_class, registered_names
from transformer_comparison.compare import accounting
from transformer_comparison.compare.sweeps import (GRID_KEYS, check_specs, SweepAxis, override_text, parse_sweeps, point_overrides,
                                                   split_sweep, sweep_label, sweep_points, swept)
from transformer_comparison.config import Config, load_config, with_overrides
from transformer_comparison.errors import UserError
from transformer_comparison.position import position_names
from transformer_comparison.presets import Preset, get_preset

# Applied before the preset and the user's overrides: a child's progress bar is noise in train.log.
COMPARE_DEFAULTS: tuple[str, ...] = ("logging.progress=false",)


@dataclass
class Cell:
    attention_type: str
    position_embedding: str
    seed: int  # the training seed
    sweep: dict[str, Scalar] = field(default_factory=dict)  # the swept keys' values
    sweep_overrides: list[str] = field(default_factory=list)  # ... as `key=value` overrides, as typed
    adjustments: dict[str, Scalar] = field(default_factory=dict)  # what compare set for this cell
    non_embedding_parameters: int | None = None
    reference_non_embedding_parameters: int | None = None
    training_flops_per_token: float | None = None

    @property
    def name(self) -> str:
        label = sweep_label(self.sweep)
        return f"{self.attention_type}-{self.position_embedding}-{label + '-' if label else ''}seed{self.seed}"

    def overrides(self) -> list[str]:
        """The overrides that turn the comparison's config into this run's (after the type flags)."""
        adjusted = [override_text(key, value) for key, value in self.adjustments.items()]
        return [*self.sweep_overrides, *adjusted, f"training.seed={self.seed}"]

    def entry(self) -> CellEntry:
        return CellEntry(name=self.name, attention_type=self.attention_type, position_embedding=self.position_embedding,
                         seed=self.seed, sweep=self.sweep, adjustments=self.adjustments,
                         non_embedding_parameters=self.non_embedding_parameters,
                         reference_non_embedding_parameters=self.reference_non_embedding_parameters,
                         training_flops_per_token=self.training_flops_per_token)


@dataclass
class Plan:
    out: Path
    config: Config
    config_hash: str
    attention_types: list[str]
    position_embeddings: list[str]
    seeds: int
    axes: list[SweepAxis]  # the swept axes (two or more values each)
    preset: Preset | None
    config_file: Path | None
    overrides: list[str]
    match: str | None = None
    cells: list[Cell] = field(default_factory=list)
    skipped: list[SkippedCell] = field(default_factory=list)

    @property
    def base_seed(self) -> int:
        return self.config.training.seed

    def grid(self) -> Grid:
        return Grid(attention_types=self.attention_types, position_embeddings=self.position_embeddings, seeds=self.seeds,
                    base_seed=self.base_seed, sweep={axis.key: list(axis.values) for axis in self.axes},
                    match=self.match)  # type: ignore[arg-type]

    @property
    def budget(self) -> str:
        if accounting.flop_budget(self.config) is not None:
            return "flops"
        return "time" if self.config.training.time_budget_seconds is not None else "tokens"

    @property
    def config_path(self) -> Path:
        return self.out / "comparison_config.yaml"

    def run_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.name


def parse_names(names: list[str] | None, valid: tuple[str, ...], flag: str) -> list[str]:
    """Names from `valid`, in `valid`'s (registration) order; None: all of them."""
    if names is None:
        return list(valid)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise UserError(f"unknown name{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {flag}; valid: {', '.join(valid)}")
    if not names:
        raise UserError(f"{flag} is empty, so the grid has no cells; valid: {', '.join(valid)}")
    return [name for name in valid if name in names]


def comma_list(text: str) -> list[str]:
    """argparse type of a comma-separated list: 'a, b,' -> ['a', 'b'] (checked by the plan)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def count(text: str | int, flag: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{flag}={text!r} should be a whole number >= 1") from None
    if value < 1:
        raise UserError(f"{flag}={value} should be >= 1")
    return value


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config, without the keys that differ per cell."""
    data = cfg.model_dump(mode="json")
    data["attention"].pop("type", None)
    data["position"].pop("type", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _keys(overrides: list[str]) -> set[str]:
    return {override.partition("=")[0].strip() for override in overrides}


def sweep_specs(args: argparse.Namespace, preset: Preset | None) -> list[tuple[str, tuple[str, ...]]]:
    """The preset's sweeps (less the keys the user sets or sweeps), then the user's --sweep."""
    user = list(args.sweep or [])
    taken = _keys(args.overrides) | {key for key, _ in user}
    clash = sorted(_keys(args.overrides) & {key for key, _ in user})
    if clash:
        raise UserError(f"{clash[0]} is both swept (--sweep) and set (an override); keep one of them")
    from_preset = [split_sweep(spec) for spec in (preset.sweeps if preset else ())]
    return [spec for spec in from_preset if spec[0] not in taken] + user


def _first_pair(attention_types: list[str], position_embeddings: list[str]) -> tuple[str, str]:
    for a in attention_types:
        for p in position_embeddings:
            if p not in kernel_class(a).refused_positions:
                return a, p
    raise UserError("every mechanism x encoding of the grid is refused by its mechanism; choose other "
                    "--attention_types / --position_embeddings")


def make_plan(args: argparse.Namespace) -> Plan:
    attention_types = parse_names(args.attention_types, registered_names(), "--attention_types")
    position_embeddings = parse_names(args.position_embeddings, position_names(), "--position_embeddings")
    seeds = count(args.seeds, "--seeds")
    preset = get_preset(args.preset) if args.preset else None
    for key in _keys(args.overrides):
        if key in GRID_KEYS and key != "training.seed":  # training.seed=S is the base seed: --seeds N runs S .. S+N-1
            raise UserError(f"{key} is set per run by the grid; choose its values with {GRID_KEYS[key]}, not an override")
    specs = sweep_specs(args, preset)
    check_specs(specs)
    plain = [f"{key}={texts[0]}" for key, texts in specs if len(texts) == 1]  # a one-value sweep is an override
    overrides = [*COMPARE_DEFAULTS, *(preset.overrides if preset else ()), *args.overrides, *plain]
    first = _first_pair(attention_types, position_embeddings)
    base = load_config(args.config, overrides, *first)
    axes = swept(parse_sweeps([spec for spec in specs if len(spec[1]) > 1], base))
    if accounting.flop_budget(base) is not None and base.training.time_budget_seconds is not None:
        raise UserError("training.flop_budget and training.time_budget_seconds are both set; a comparison has one budget")
    match = args.match
    plan = Plan(out=args.out or Path("results"), config=base, config_hash=config_hash(base), attention_types=attention_types,
                position_embeddings=position_embeddings, seeds=seeds, axes=axes, preset=preset, config_file=args.config,
                overrides=[*args.overrides, *plain], match=match)
    if args.out is None:  # the grid too decides the default directory, so another grid gets another one
        grid_digest = hashlib.sha256(json.dumps([plan.config_hash, plan.grid().model_dump(mode="json")], sort_keys=True).encode())
        plan.out = Path("results") / f"comparison-{grid_digest.hexdigest()[:8]}"
    plan_cells(plan)
    return plan


def plan_cells(plan: Plan) -> None:
    """Fill plan.cells and plan.skipped: every (mechanism, encoding, sweep point, seed), validated."""
    counts: dict[str, accounting.ParameterCount] = {}

    def non_embedding(cfg: Config) -> int:
        key = cfg.model_dump_json()
        if key not in counts:
            counts[key] = accounting.parameter_count(cfg)
        return counts[key].non_embedding

    for a in plan.attention_types:
        refused = kernel_class(a).refused_positions
        for p in plan.position_embeddings:
            if p in refused:
                plan.skipped.append(SkippedCell(attention_type=a, position_embedding=p, reason=refused[p]))
                continue
            trained: dict[str, str] = {}  # the effective config of each point already planned -> its label
            for point in sweep_points(plan.axes):
                texts = point_overrides(point, plan.axes)
                try:
                    cfg = with_overrides(plan.config, [f"attention.type={a}", f"position.type={p}", *texts])
                    same = trained.setdefault(effective_config(cfg), sweep_label(point))
                    if same != sweep_label(point):  # a swept key this mechanism / encoding does not have
                        plan.skipped.append(SkippedCell(attention_type=a, position_embedding=p, sweep=point,
                                                        reason=f"the same run as {same}: {a} x {p} does not use the swept value"))
                        continue
                    reference = non_embedding(accounting.reference_config(cfg))
                    adjustments = matched_width(cfg, reference) if plan.match == "params" else {}
                    cfg = with_overrides(cfg, [override_text(k, v) for k, v in adjustments.items()])
                    own = non_embedding(cfg)
                    flops = accounting.training_flops_per_token(cfg, own)
                    if accounting.flop_budget(cfg) is not None:
                        adjustments |= {"training.max_steps": accounting.steps_for_flop_budget(cfg, flops),
                                        "training.num_epochs": None, "training.flop_budget": None}
                except UserError as error:
                    raise UserError(f"cell {' x '.join([a, p, *texts])}: {error}") from None
                for i in range(plan.seeds):
                    plan.cells.append(Cell(a, p, plan.base_seed + i, dict(point), texts, dict(adjustments), own, reference, flops))


def effective_config(cfg: Config) -> str:
    """The config as the run sees it: without the option subsections of the other mechanisms and
    encodings (so sweeping attention.local.window does not train the same retention run twice)."""
    data = cfg.model_dump(mode="json")
    for section, names, chosen in (("attention", registered_names(), cfg.attention.type), ("position", position_names(), cfg.position.type)):
        for name in names:
            if name != chosen:
                data[section].pop(name, None)
    return json.dumps(data, sort_keys=True)


def matched_width(cfg: Config, reference: int) -> dict[str, Scalar]:
    """--match params: the MLP width that brings the cell within 1% of dot_product's non-embedding parameters."""
    if cfg.attention.type == accounting.reference_mechanism():
        return {}
    ratio = accounting.match_mlp_ratio(cfg, reference)
    return {} if ratio is None else {accounting.MLP_RATIO_KEY: ratio}
