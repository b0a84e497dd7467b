"""report.statistics: the t-interval against printed t tables, the grouping of overlapping cells, the
best setting per cell."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from transformer_comparison.report.statistics import Estimate, best_setting, estimate, group_label, indistinguishable

T_975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}  # Student's t, 97.5% quantile (degrees of freedom -> t), printed tables


@pytest.mark.parametrize("values", [[1.0, 1.2], [1.669, 1.671, 1.662], [3.0, 3.1, 2.9, 3.05, 2.95], list(range(10))])
def test_interval_is_the_t_interval(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975[n - 1] * std / math.sqrt(n)
    e = estimate(values)
    assert (e.n, e.mean, e.std) == (n, pytest.approx(mean), pytest.approx(std))
    assert (e.low + e.high) / 2 == pytest.approx(mean) and (e.high - e.low) / 2 == pytest.approx(half, rel=5e-4)  # the table rounds t to 3 decimals


def test_estimate_edge_cases():
    assert estimate([]) is None and estimate([None, float("nan")]) is None
    one = estimate([2.0, float("nan")])
    assert (one.n, one.mean, one.std, one.low) == (1, 2.0, None, None)
    same = estimate([1.5, 1.5, 1.5])
    assert (same.std, same.low, same.high) == (0.0, 1.5, 1.5)


def interval(mean: float, half: float) -> Estimate:
    return Estimate(3, mean, half, mean - half, mean + half)


def test_groups_follow_the_leaders_interval():
    # b overlaps a; c overlaps b but not a, so it starts the next group; d overlaps c
    estimates = [interval(1.0, 0.1), interval(1.15, 0.1), interval(1.25, 0.1), interval(1.3, 0.1), interval(2.0, 0.1)]
    assert indistinguishable(estimates) == [0, 0, 1, 1, 2]
    assert indistinguishable([Estimate(1, 1.0, None, None, None), Estimate(1, 1.0, None, None, None)]) == [0, 1]
    assert [group_label(i) for i in (0, 1, 25, 26, 27)] == ["A", "B", "Z", "AA", "AB"]


def test_best_setting_per_cell():
    table = pd.DataFrame([
        {"attention_type": "a", "position_embedding": "rope", "lr": 1e-3, "final_val_loss_mean": 2.0},
        {"attention_type": "a", "position_embedding": "rope", "lr": 2e-3, "final_val_loss_mean": 1.9},
        {"attention_type": "b", "position_embedding": "rope", "lr": 1e-3, "final_val_loss_mean": 2.1},
        {"attention_type": "b", "position_embedding": "rope", "lr": 2e-3, "final_val_loss_mean": 2.3},
        {"attention_type": "c", "position_embedding": "rope", "lr": 1e-3, "final_val_loss_mean": None},
    ])
    best = best_setting(table, "lr", ["attention_type", "position_embedding"])
    assert best[["attention_type", "lr"]].values.tolist() == [["a", 2e-3], ["b", 1e-3], ["c", 1e-3]]
