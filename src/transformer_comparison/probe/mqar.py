"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology: Measuring and Improving
Recall in Efficient Language Models", section 3), generated from the paper's definition with the
conventions of zoology's `zoology/data/multiquery_ar.py`.

An example of length L (even) over a vocabulary of V tokens holds D key-value pairs:

    positions 0 .. 2D-1        k_1 v_1 k_2 v_2 ... k_D v_D          (the context)
    positions 2D .. L-1        (L - 2D) / 2 query slots, two positions apart (slot s at 2D + 2s)

- keys: D distinct tokens of [1, V/2); values: D distinct tokens of [V/2, V);
- the key of pair j is repeated at query slot g_j; the slots are drawn without replacement with
  probability proportional to alpha * i^(alpha - 1) for slot i = 1 .. (L - 2D)/2, in pair order
  (pair 1 gets the first slot drawn), so most queries follow the context closely and a few are far;
- every other position is 0, or a uniform token of [0, V) when `random_non_queries` is on;
- labels: the value of pair j at its query position (next-token prediction: having read the key,
  predict its value), -100 everywhere else (ignored by the loss and the accuracy).

Slots are drawn with the Gumbel top-k trick (Vieira 2014; Kool et al. 2019): the D largest of
log p_i + Gumbel noise, taken in decreasing order, are distributed exactly as D successive draws
without replacement, and one vectorised argsort covers every example. Generating N examples costs
O(N (V + L) log(V + L)) time and O(N (V + L)) memory.

`fraction_within(window, ...)` is the share of queries whose value lies within `window` positions
of the query (the query included), i.e. what a sliding window of that size can read directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transformer_comparison.errors import UserError

IGNORE_INDEX = -100  # the label of positions that are not scored (PyTorch's cross_entropy default)
DEFAULT_ALPHA = 0.01  # the zoology default: p_i ~ i^-0.99, roughly 1/i


@dataclass(frozen=True)
class MQARTask:
    """The parameters of one MQAR distribution."""

    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    alpha: float = DEFAULT_ALPHA
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        check_task(self.vocab_size, self.seq_len, self.num_kv_pairs, self.alpha)

    @property
    def num_slots(self) -> int:
        """Query slots after the context: (L - 2D) / 2."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2


@dataclass(frozen=True)
class Examples:
    """A set of examples in the interchange format: int64 `inputs` and `labels`, both (N, L)."""

    inputs: np.ndarray
    labels: np.ndarray

    @property
    def seq_len(self) -> int:
        return int(self.inputs.shape[1])

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def check_task(vocab_size: int, seq_len: int, num_kv_pairs: int, alpha: float = DEFAULT_ALPHA) -> None:
    """Raise UserError (one line, naming the constraint) unless the parameters define an MQAR task."""
    check_layout(seq_len, num_kv_pairs, alpha)
    if vocab_size <= seq_len:
        raise UserError(f"vocab_size={vocab_size} must exceed seq_len={seq_len} (the constraint V > L, as in zoology); "
                        f"use vocab_size >= {seq_len + 1}")


def check_layout(seq_len: int, num_kv_pairs: int, alpha: float = DEFAULT_ALPHA) -> None:
    """The constraints on L, D and alpha alone (UserError naming the one broken)."""
    if seq_len < 4 or seq_len % 2:
        raise UserError(f"MQAR needs an even sequence length >= 4 (keys and values come in pairs, queries two "
                        f"positions apart); got seq_len={seq_len}")
    if num_kv_pairs < 1:
        raise UserError(f"MQAR needs num_kv_pairs >= 1; got {num_kv_pairs}")
    if 4 * num_kv_pairs > seq_len:
        raise UserError(f"num_kv_pairs={num_kv_pairs} does not fit seq_len={seq_len}: the constraint is 4 * D <= L "
                        f"(2D context tokens and D query slots two apart); the largest D for L={seq_len} is {seq_len // 4}")
    if not alpha > 0:
        raise UserError(f"the power-law parameter alpha must be > 0 (1 gives uniform query slots); got {alpha}")


def slot_probabilities(num_slots: int, alpha: float) -> np.ndarray:
    """P(slot i) proportional to alpha * i^(alpha - 1), i = 1 .. num_slots (index 0 is slot 1)."""
    weights = alpha * np.arange(1, num_slots + 1, dtype=np.float64) ** (alpha - 1.0)
    return weights / weights.sum()


def sample_query_slots(rng: np.random.Generator, num_examples: int, num_slots: int, num_kv_pairs: int,
                       alpha: float) -> np.ndarray:
    """(N, D) slot indices (0-based), distinct within a row, in draw order: column j is the j-th draw
    without replacement from `slot_probabilities` (Gumbel top-k)."""
    log_p = np.log(slot_probabilities(num_slots, alpha))
    perturbed = log_p + rng.gumbel(size=(num_examples, num_slots))
    return np.argsort(-perturbed, axis=1, kind="stable")[:, :num_kv_pairs]


def _distinct_tokens(rng: np.random.Generator, num_examples: int, low: int, high: int, count: int) -> np.ndarray:
    """(N, count) tokens of [low, high), distinct within a row, in uniformly random order."""
    return np.argsort(rng.random((num_examples, high - low)), axis=1)[:, :count] + low


def generate(task: MQARTask, num_examples: int, seed: int | np.random.Generator) -> Examples:
    """`num_examples` examples of `task`; the same seed gives the same examples."""
    if num_examples < 1:
        raise UserError(f"the number of MQAR examples must be >= 1; got {num_examples}")
    rng = np.random.default_rng(seed)
    n, length, pairs, vocab = num_examples, task.seq_len, task.num_kv_pairs, task.vocab_size
    half = vocab // 2
    keys = _distinct_tokens(rng, n, 1, half, pairs)
    values = _distinct_tokens(rng, n, half, vocab, pairs)
    slots = sample_query_slots(rng, n, task.num_slots, pairs, task.alpha)

    inputs = np.zeros((n, length), dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0 : 2 * pairs : 2] = keys
    inputs[:, 1 : 2 * pairs : 2] = values
    query_positions = 2 * pairs + 2 * slots
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    np.put_along_axis(labels, query_positions, values, axis=1)
    if task.random_non_queries:
        filler = np.ones((n, length), dtype=bool)
        filler[:, : 2 * pairs] = False
        np.put_along_axis(filler, query_positions, False, axis=1)
        inputs[filler] = rng.integers(0, vocab, size=int(filler.sum()))
    return Examples(inputs, labels)


def query_distances(seq_len: int, num_kv_pairs: int, alpha: float, num_examples: int, seed: int) -> np.ndarray:
    """(N, D) distances from each query to its value: query position - value position (>= 2)."""
    num_slots = (seq_len - 2 * num_kv_pairs) // 2
    slots = sample_query_slots(np.random.default_rng(seed), num_examples, num_slots, num_kv_pairs, alpha)
    query_positions = 2 * num_kv_pairs + 2 * slots
    value_positions = 2 * np.arange(num_kv_pairs) + 1  # pair j (0-based) has its value at 2j + 1
    return query_positions - value_positions


def fraction_within(window: int, seq_len: int, num_kv_pairs: int, alpha: float = DEFAULT_ALPHA,
                    num_examples: int = 4096, seed: int = 0) -> float:
    """Share of queries whose value is among the `window` most recent positions (the query's own
    included), i.e. distance <= window - 1: what one sliding-window layer reads directly. Estimated
    from `num_examples` generated examples (standard error <= 0.5 / sqrt(num_examples * D))."""
    check_layout(seq_len, num_kv_pairs, alpha)
    if window < 1:
        raise UserError(f"window must be >= 1; got {window}")
    distances = query_distances(seq_len, num_kv_pairs, alpha, num_examples, seed)
    return float(np.mean(distances <= window - 1))


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of the share of an example's labelled positions predicted right; examples
    without labels do not count. predictions, labels: (N, L)."""
    scored = labels != IGNORE_INDEX
    counts = scored.sum(axis=1)
    if not counts.any():
        raise UserError("no labelled positions to score (every label is -100)")
    correct = ((predictions == labels) & scored).sum(axis=1)
    keep = counts > 0
    return float(np.mean(correct[keep] / counts[keep]))
