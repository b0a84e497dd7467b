"""The MQAR generator against the paper's definition: layout, targets, label counts, the power law
of the query slots (against numpy's own sampling without replacement), filler tokens, reach."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from transformer_comparison.errors import UserError
from transformer_comparison.probe.mqar import (
    IGNORE_INDEX,
    MQARTask,
    accuracy,
    check_task,
    fraction_within,
    generate,
    query_distances,
    sample_query_slots,
    slot_probabilities,
)

TASK = MQARTask(vocab_size=64, seq_len=48, num_kv_pairs=6)


@pytest.fixture(scope="module")
def examples():
    return generate(TASK, 2000, seed=3)


def test_shapes_and_dtypes(examples):
    assert examples.inputs.shape == examples.labels.shape == (2000, TASK.seq_len)
    assert examples.inputs.dtype == examples.labels.dtype == np.int64


def test_context_holds_each_key_once_then_its_value(examples):
    d, half = TASK.num_kv_pairs, TASK.vocab_size // 2
    keys, values = examples.inputs[:, 0 : 2 * d : 2], examples.inputs[:, 1 : 2 * d : 2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < TASK.vocab_size)).all()
    assert all(len(set(row)) == d for row in keys) and all(len(set(row)) == d for row in values)
    assert (examples.labels[:, : 2 * d] == IGNORE_INDEX).all()  # nothing in the context is scored


def test_every_query_targets_its_keys_value(examples):
    d = TASK.num_kv_pairs
    for inputs, labels in zip(examples.inputs[:300], examples.labels[:300]):
        pairs = dict(zip(inputs[0 : 2 * d : 2], inputs[1 : 2 * d : 2]))
        positions = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(positions) == d  # label count == D
        assert ((positions - 2 * d) % 2 == 0).all() and (positions >= 2 * d).all()  # query slots, two apart
        assert sorted(inputs[positions]) == sorted(pairs)  # each key queried once
        for position in positions:
            assert labels[position] == pairs[inputs[position]]


def test_non_queries_are_zero_without_random_fill():
    task = MQARTask(64, 48, 6, random_non_queries=False)
    ex = generate(task, 200, seed=0)
    filler = ex.labels == IGNORE_INDEX
    filler[:, : 2 * task.num_kv_pairs] = False
    assert (ex.inputs[filler] == 0).all()
    assert (ex.inputs[ex.labels != IGNORE_INDEX] > 0).all()


def test_random_non_queries_are_uniform_tokens(examples):
    filler = examples.labels == IGNORE_INDEX
    filler[:, : 2 * TASK.num_kv_pairs] = False
    tokens = examples.inputs[filler]
    counts = np.bincount(tokens, minlength=TASK.vocab_size)
    assert len(counts) == TASK.vocab_size  # nothing outside [0, V)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_first_query_slot_follows_the_power_law():
    """Pair 1 takes the first draw, whose law is exactly p_i ~ alpha i^(alpha-1)."""
    slots, alpha = 30, 0.01
    p = slot_probabilities(slots, alpha)
    first = sample_query_slots(np.random.default_rng(11), 20000, slots, 5, alpha)[:, 0]
    observed = np.bincount(first, minlength=slots)
    assert stats.chisquare(observed, p * len(first)).pvalue > 1e-3
    uniform = sample_query_slots(np.random.default_rng(11), 20000, slots, 5, 1.0)[:, 0]
    assert stats.chisquare(np.bincount(uniform, minlength=slots), p * len(uniform)).pvalue < 1e-9  # the test can fail


def test_slots_match_sequential_sampling_without_replacement():
    """Which slots are taken, and in which draw, against numpy's own weighted choice without replacement."""
    slots, pairs, alpha, n = 12, 4, 0.01, 6000
    p = slot_probabilities(slots, alpha)
    ours = sample_query_slots(np.random.default_rng(5), n, slots, pairs, alpha)
    rng = np.random.default_rng(6)
    reference = np.stack([rng.choice(slots, size=pairs, replace=False, p=p) for _ in range(n)])
    assert all(len(set(row)) == pairs for row in ours)
    for draw in range(pairs):
        table = np.stack([np.bincount(ours[:, draw], minlength=slots), np.bincount(reference[:, draw], minlength=slots)])
        table = table[:, table.sum(axis=0) > 0]
        assert stats.chi2_contingency(table).pvalue > 1e-3, f"draw {draw}"


def test_query_positions_in_generated_examples_follow_slot_law():
    task = MQARTask(64, 40, 1)  # one pair: its query slot is one draw of the power law
    ex = generate(task, 20000, seed=2)
    slot = (np.argmax(ex.labels != IGNORE_INDEX, axis=1) - 2) // 2
    p = slot_probabilities(task.num_slots, task.alpha)
    assert stats.chisquare(np.bincount(slot, minlength=task.num_slots), p * len(slot)).pvalue > 1e-3


def test_same_seed_same_examples():
    a, b, c = generate(TASK, 50, 9), generate(TASK, 50, 9), generate(TASK, 50, 10)
    assert (a.inputs == b.inputs).all() and (a.labels == b.labels).all()
    assert (a.inputs != c.inputs).any()


@pytest.mark.parametrize("args, words", [
    ((64, 47, 4), "even"),
    ((64, 48, 13), "4 * D <= L"),
    ((48, 48, 4), "V > L"),
    ((64, 48, 0), ">= 1"),
    ((64, 48, 4, 0.0), "alpha"),
])
def test_bad_parameters_name_the_constraint(args, words):
    with pytest.raises(UserError, match=None) as error:
        check_task(*args)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_fraction_within_matches_the_examples():
    """The reach computed from the slot sampler agrees with distances read off generated examples."""
    task = MQARTask(128, 64, 8)
    ex = generate(task, 3000, seed=4)
    d = task.num_kv_pairs
    distances = []
    for inputs, labels in zip(ex.inputs, ex.labels):
        for position in np.flatnonzero(labels != IGNORE_INDEX):
            value_position = np.flatnonzero(inputs[: 2 * d] == labels[position])[0]
            distances.append(position - value_position)
    distances = np.array(distances)
    for window in (4, 16, 32):
        assert abs(fraction_within(window, 64, 8) - np.mean(distances <= window - 1)) < 0.02
    assert fraction_within(1, 64, 8) == 0.0 and fraction_within(64, 64, 8) == 1.0
    assert query_distances(64, 8, 0.01, 100, 0).min() >= 1


def test_accuracy_averages_within_then_across_examples():
    labels = np.full((2, 8), IGNORE_INDEX)
    labels[0, 1] = 5
    labels[1, [1, 3, 5]] = 7
    predictions = np.zeros((2, 8), dtype=np.int64)
    predictions[0, 1] = 5  # example 0: 1/1 right; example 1: 0/3
    assert accuracy(predictions, labels) == 0.5  # pooled over positions it would be 0.25
    with pytest.raises(UserError):
        accuracy(predictions, np.full((2, 8), IGNORE_INDEX))
