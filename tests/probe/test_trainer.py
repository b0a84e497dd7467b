"""The training loop and the measured decoding state: what `state_bytes` reports, early stopping,
the MLP switch, determinism."""

from __future__ import annotations

import numpy as np
import pytest

import transformer_comparison.attention  # noqa: F401  (registers the mechanisms)
from transformer_comparison.attention.registry import registered_names
from transformer_comparison.config import load_config
from transformer_comparison.probe.mqar import MQARTask, generate
from transformer_comparison.probe.trainer import (
    DECAY_FRACTION, MIN_LR_FRACTION, Budget, batch_order, build_probe_model, learning_rate_at, measure_state_bytes,
    train_and_score,
)

D_MODEL, WINDOW = 16, 8


def config(attention: str, position: str = "rope"):
    overrides = ["model.num_layers=2", "model.num_heads=2", f"model.d_model={D_MODEL}", "model.context_length=64",
                 f"attention.window={WINDOW}", "training.device=cpu"]
    return load_config(None, overrides, attention_type=attention, position_embedding=position)


def test_the_mechanisms_under_test_are_registered():
    assert {"dot_product", "local"} <= set(registered_names())


def test_dot_product_state_grows_with_the_length_and_local_state_is_bounded():
    dense = build_probe_model(config("dot_product"), 32, mlp=False)
    local = build_probe_model(config("local"), 32, mlp=False)
    lengths = (16, 32, 64)
    dense_bytes = [measure_state_bytes(dense, n, dense.lm_head.weight.device) for n in lengths]
    local_bytes = [measure_state_bytes(local, n, local.lm_head.weight.device) for n in lengths]
    assert dense_bytes == [2 * n * D_MODEL * 4 for n in lengths]  # keys and values of every token, float32
    assert local_bytes[0] == local_bytes[1] == local_bytes[2] <= 2 * WINDOW * D_MODEL * 4  # the window's keys only
    assert local_bytes[0] < dense_bytes[0]


def test_mlp_off_removes_the_mlp_parameters():
    with_mlp = build_probe_model(config("dot_product"), 32, mlp=True)
    without = build_probe_model(config("dot_product"), 32, mlp=False)
    assert with_mlp.num_parameters() - without.num_parameters() == 2 * 2 * 4 * D_MODEL * D_MODEL  # 2 blocks x fc, proj


def _data():
    task = MQARTask(32, 16, 2)
    return generate(task, 128, 0), {16: generate(task, 32, 1), 24: generate(MQARTask(32, 24, 2), 32, 2)}


def test_early_stopping_and_every_test_length_scored():
    train, tests = _data()
    budget = Budget(batch_size=16, max_steps=30, warmup_steps=2, eval_interval=5, eval_examples=32, target_accuracy=0.0)
    result = train_and_score(config("dot_product"), 32, 1e-2, 0, budget, train, tests)
    assert result.status == "early_stopped" and result.train_steps == 5  # any accuracy > 0 passes a bar of 0
    assert set(result.accuracy) == set(result.state_bytes) == {16, 24}
    assert result.state_bytes[24] == result.state_bytes[16] * 24 // 16 and result.state_grows


def test_a_run_is_a_pure_function_of_its_inputs():
    train, tests = _data()
    budget = Budget(batch_size=16, max_steps=6, warmup_steps=2, eval_interval=3, eval_examples=32)
    first = train_and_score(config("local"), 32, 1e-2, 3, budget, train, tests)
    second = train_and_score(config("local"), 32, 1e-2, 3, budget, train, tests)
    assert first.status == "completed" and first.train_steps == 6 and not first.state_grows  # local: a bounded cache
    assert first.accuracy == second.accuracy and first.final_train_loss == second.final_train_loss


@pytest.mark.parametrize("examples, batch", [(100, 16), (10, 16)])
def test_batch_order_covers_the_examples(examples, batch):
    order = batch_order(examples, batch, 20, seed=1)
    assert order.shape == (20, batch) and order.min() >= 0 and order.max() < examples
    if examples >= batch:  # within a pass, no example twice
        per_pass = examples // batch
        assert len(np.unique(order[:per_pass])) == per_pass * batch
    assert (order == batch_order(examples, batch, 20, seed=1)).all()


def test_learning_rate_warms_up_holds_then_decays_to_a_tenth():
    budget = Budget(max_steps=100, warmup_steps=10)
    rates = [learning_rate_at(step, 1.0, budget) for step in range(100)]
    assert rates[0] < rates[5] < rates[9] < 1.0  # warmup
    assert rates[10] == rates[50] == rates[79] == 1.0  # held until the last DECAY_FRACTION of the budget
    assert rates[80] == 1.0 and all(a >= b for a, b in zip(rates[80:], rates[81:]))
    assert abs(learning_rate_at(100, 1.0, budget) - MIN_LR_FRACTION) < 1e-12
    assert DECAY_FRACTION == 0.2
