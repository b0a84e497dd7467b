"""Sweep axes: `--sweep KEY=V1,V2,...` over any config key, validated by building the config.

    axes = parse_sweeps(["training.learning_rate=5e-4,1e-3", "model.d_model=64,128"], base_config)
    for values in sweep_points(axes): ...       # {"training.learning_rate": 0.0005, "model.d_model": 64}, ...
    sweep_label(values, axes)                    # "learning_rate=0.0005-d_model=64" (part of the run's name)

A key is swept when it has two or more values; `--sweep KEY=V` with one value just sets KEY for
every run (and replaces a preset's sweep of KEY). The keys the grid itself sets per run
(attention.type, position.type, training.seed) cannot be swept: their flags are the axes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from transformer_comparison.artifacts.comparison import Scalar
from transformer_comparison.config import Config, with_overrides
from transformer_comparison.errors import UserError

GRID_KEYS = {"attention.type": "--attention_types", "position.type": "--position_embeddings", "training.seed": "--seeds"}


@dataclass(frozen=True)
class SweepAxis:
    key: str  # a dotted config key, e.g. training.learning_rate
    texts: tuple[str, ...]  # the values as typed
    values: tuple[Scalar, ...]  # the values as the config holds them

    @property
    def override_texts(self) -> list[str]:
        return [f"{self.key}={text}" for text in self.texts]


def split_sweep(text: str) -> tuple[str, tuple[str, ...]]:
    """argparse type of --sweep: 'KEY=V1,V2' -> (KEY, (V1, V2)); checked against the config later."""
    key, _, values = text.partition("=")
    return key.strip(), tuple(v.strip() for v in values.split(",") if v.strip())


def format_value(value: Scalar) -> str:
    """A swept value as run names and report headers show it: 0.0005, 64, true, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def override_text(key: str, value: Scalar) -> str:
    """`key=value` for a value compare computed (floats in full precision)."""
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={format_value(value)}"


def _dotted_get(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _scalar(text: str) -> Scalar:
    """A typed value read like the config reads it (int, float, bool, null, else the text)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def config_value(cfg: Config, key: str, text: str) -> Scalar:
    """The value of `key` in a built config (the text parsed as a scalar for a key the config spells
    differently, e.g. a legacy flat key)."""
    found, value = _dotted_get(cfg.model_dump(mode="json"), key)
    if found and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    return _scalar(text)


def check_specs(specs: list[tuple[str, tuple[str, ...]]]) -> None:
    """Every --sweep names a key the grid does not own, with distinct values."""
    for key, texts in specs:
        if not key or not texts:
            raise UserError(f"--sweep {key or '?'}=...: give a key and one or more values, e.g. "
                            "--sweep training.learning_rate=3e-4,1e-3")
        if key in GRID_KEYS:
            raise UserError(f"--sweep {key}: the grid sets {key} per run; choose its values with {GRID_KEYS[key]}")
        if len(set(texts)) != len(texts):
            raise UserError(f"--sweep {key}={','.join(texts)} repeats a value")


def parse_sweeps(specs: list[tuple[str, tuple[str, ...]]], base: Config) -> list[SweepAxis]:
    """Validated axes, one per key (the last --sweep of a key wins); each value checked by building
    the config with it, so a bad key or value is a one-line error naming it."""
    check_specs(specs)
    by_key = {key: texts for key, texts in specs}
    axes = []
    for key, texts in by_key.items():
        values = []
        for text in texts:
            try:
                cfg = with_overrides(base, [f"{key}={text}"])
            except UserError as error:
                raise UserError(f"--sweep {key}={text}: {error}") from None
            values.append(config_value(cfg, key, text))
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"--sweep {key}={','.join(texts)}: two values are the same ({', '.join(map(format_value, values))})")
        axes.append(SweepAxis(key, tuple(texts), tuple(values)))
    return axes


def swept(axes: list[SweepAxis]) -> list[SweepAxis]:
    """The axes with two or more values (the others are plain overrides)."""
    return [axis for axis in axes if len(axis.values) > 1]


def sweep_points(axes: list[SweepAxis]) -> list[dict[str, Scalar]]:
    """Every combination of the swept values, the first axis varying slowest ([{}] without axes)."""
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def point_overrides(point: dict[str, Scalar], axes: list[SweepAxis]) -> list[str]:
    """The `key=value` overrides of one sweep point, with the values as typed."""
    overrides = []
    for axis in axes:
        if axis.key in point:
            text = axis.texts[[repr(v) for v in axis.values].index(repr(point[axis.key]))]
            overrides.append(f"{axis.key}={text}")
    return overrides


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key by its last component when that is unambiguous (learning_rate), else in full."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (tail if last.count(tail) == 1 else key) for key, tail in zip(keys, last)}


def sweep_label(point: dict[str, Scalar]) -> str:
    """The part of a run's name that names its swept values: 'learning_rate=0.001-d_model=64'."""
    names = short_names(list(point))
    parts = [f"{names[key]}={format_value(value)}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))
