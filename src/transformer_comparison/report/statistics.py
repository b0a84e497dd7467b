"""Seed statistics of the report: mean +- std, the 95% t-interval (scipy.stats), and which cells the
seeds cannot tell apart.

    e = estimate([1.669, 1.671, 1.662])        # Estimate(n=3, mean, std, low, high)
    groups = indistinguishable([e1, e2, e3])    # [0, 0, 1]: group of each (sorted best first)
    best = best_setting(table, "training.learning_rate", keys)   # per cell, the rate with the lowest mean loss

The interval is Student's t on the sample mean, mean +- t(0.975, n-1) s / sqrt(n): with 3 seeds it
is about +-2.5 standard deviations wide, which is what 3 seeds can honestly say. Two cells whose
intervals overlap are "not distinguishable at these seeds"; that is a conservative reading (two
overlapping 95% intervals can still differ at the 5% level), never an anti-conservative one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    std: float | None  # sample std (n - 1); None with one value
    low: float | None  # the 95% t-interval of the mean; None with one value
    high: float | None

    def overlaps(self, other: Estimate) -> bool:
        if None in (self.low, self.high, other.low, other.high):
            return False
        return self.low <= other.high and other.low <= self.high  # type: ignore[operator]


def estimate(values: Sequence[Any]) -> Estimate | None:
    """Mean, sample std and 95% t-interval of the finite values (None when there is none)."""
    numbers = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not numbers:
        return None
    n = len(numbers)
    mean = sum(numbers) / n
    if n == 1:
        return Estimate(1, mean, None, None, None)
    std = float(pd.Series(numbers).std())
    if std == 0.0:
        return Estimate(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(CONFIDENCE, df=n - 1, loc=mean, scale=stats.sem(numbers))
    return Estimate(n, mean, std, float(low), float(high))


def indistinguishable(estimates: Sequence[Estimate]) -> list[int]:
    """Group numbers for estimates sorted best (lowest mean) first: a group starts at a cell and takes
    every following cell whose interval overlaps that first cell's; the next cell that does not
    overlap starts the next group. Without intervals (one seed) every cell is its own group."""
    groups: list[int] = []
    leader: Estimate | None = None
    for item in estimates:
        if leader is None or not leader.overlaps(item):
            leader = item
            groups.append(groups[-1] + 1 if groups else 0)
        else:
            groups.append(groups[-1])
    return groups


def group_label(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def best_setting(table: pd.DataFrame, key: str, keys: list[str], metric: str = "final_val_loss_mean") -> pd.DataFrame:
    """Per group of `keys` (the cell without `key`), the row whose `metric` is lowest: e.g. each
    mechanism x encoding at its own best learning rate. Groups with no finite value keep their first row."""
    if table.empty:
        return table
    chosen = []
    for _, group in table.groupby(keys, sort=False, dropna=False):
        values = pd.to_numeric(group[metric], errors="coerce")
        chosen.append(group.index[0] if values.isna().all() else values.idxmin())
    return table.loc[chosen]
