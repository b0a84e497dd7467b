"""Train one GPT on recall examples and score it: one learning rate of one probe cell.

A run is a pure function of its `RunSpec`: the model is the project's GPT built from the resolved
config (`model.build_model`), trained with AdamW (weight decay on matrices only, as `tcompare
train`), a linear warmup, the peak learning rate held, and a cosine decay to a tenth of it over
the last DECAY_FRACTION of the step budget (warmup-stable-decay), on batches drawn without replacement from the training examples (reshuffled every pass).
Every `eval_interval` steps it is scored on the first `eval_examples` held-out examples and stops
early once that accuracy exceeds `target_accuracy`; the final accuracy is over the whole test set
of every test length. The loss is cross-entropy over the labelled positions only.

Without `mlp` (the zoology setting: sequence mixer only, `state_mixer=Identity`) each block's MLP
is replaced by a module that adds nothing (`drop_mlps`): the residual stream then carries only
embeddings and attention, as in the paper's recall models.

`state_bytes`: what the mechanism holds per layer to decode the next token after `seq_len` tokens,
measured, never looked up by name: a prefill of that many tokens (batch 1) into `model.new_caches()`,
then the caches' `nbytes` summed and divided by the number of layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from transformer_comparison.config import Config
from transformer_comparison.model import GPT, build_model
from transformer_comparison.numerics import prepare_process
from transformer_comparison.probe.mqar import IGNORE_INDEX, Examples, accuracy
from transformer_comparison.runtime import make_adamw

EVAL_BATCH = 256  # examples per evaluation forward pass
MIN_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of the peak learning rate
# Share of the budget spent decaying. Recall is learned in a sudden jump after a plateau; a decay
# over the whole budget slows the jump down: dot_product + RoPE at L = 64, D = 16, d_model = 64
# (the quick preset) stayed at 0.10 after 450 steps with a cosine over 450 steps, and reached 0.999
# at step 425 with a cosine over 800.
DECAY_FRACTION = 0.2


@dataclass(frozen=True)
class Budget:
    """How one run trains: batch, step budget, early stopping."""

    batch_size: int = 64
    max_steps: int = 1000
    warmup_steps: int = 50
    eval_interval: int = 50
    eval_examples: int = 256
    target_accuracy: float = 0.99


@dataclass
class RunResult:
    """What one run produced: accuracy and state size per test length, how it trained."""

    accuracy: dict[int, float]  # test length -> accuracy on the whole test set of that length
    state_bytes: dict[int, int]  # test length -> bytes per layer to decode the next token
    state_grows: bool  # whether state_bytes at twice the shortest test length exceeds it there
    train_steps: int
    status: str  # "early_stopped" | "completed" | "diverged"
    final_train_loss: float
    num_parameters: int
    wall_seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out accuracy) of each evaluation


class NoMLP(torch.nn.Module):
    """Stands in for a block's MLP: contributes nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def drop_mlps(model: GPT) -> GPT:
    """The model with every block's MLP replaced by NoMLP (and its parameters gone)."""
    for block in model.blocks:
        if not hasattr(block, "mlp"):
            raise TypeError("the GPT's blocks have no `mlp` attribute to drop; run the probe with --mlp on")
        block.mlp = NoMLP()
    return model


def build_probe_model(cfg: Config, vocab_size: int, mlp: bool) -> GPT:
    """The project's GPT for `cfg`, with or without its MLPs."""
    model = build_model(cfg, vocab_size)
    return model if mlp else drop_mlps(model)


def resolve_device(cfg: Config) -> torch.device:
    """training.device, with auto meaning cuda when available, else cpu."""
    name = cfg.training.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def learning_rate_at(step: int, peak: float, budget: Budget) -> float:
    """Linear warmup to `peak`, `peak` held, then a cosine decay to MIN_LR_FRACTION * peak over the
    last DECAY_FRACTION of the step budget."""
    if step < budget.warmup_steps:
        return peak * (step + 1) / (budget.warmup_steps + 1)
    decay_start = max(budget.warmup_steps, math.floor((1.0 - DECAY_FRACTION) * budget.max_steps))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, budget.max_steps - decay_start))
    low = MIN_LR_FRACTION * peak
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - low)


def recall_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled positions (label != -100) of (B, L, V) logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def predict(model: GPT, inputs: np.ndarray, device: torch.device) -> np.ndarray:
    """Greedy next-token predictions (N, L) for every position, in batches of EVAL_BATCH."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(inputs), EVAL_BATCH):
        idx = torch.from_numpy(inputs[start : start + EVAL_BATCH]).to(device)
        logits, _, _ = model(idx)
        out.append(logits.argmax(dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def evaluate(model: GPT, examples: Examples, device: torch.device, limit: int | None = None) -> float:
    """Recall accuracy (mqar.accuracy) on the first `limit` examples (None: all)."""
    inputs, labels = examples.inputs[:limit], examples.labels[:limit]
    return accuracy(predict(model, inputs, device), labels)


@torch.no_grad()
def measure_state_bytes(model: GPT, seq_len: int, device: torch.device) -> int:
    """Bytes per layer the model's decoding caches hold after a prefill of `seq_len` tokens (batch 1)."""
    was_training = model.training
    model.eval()
    caches = model.new_caches()
    idx = torch.zeros((1, seq_len), dtype=torch.long, device=device)
    model(idx, caches=caches)
    model.train(was_training)
    return int(sum(cache.nbytes for cache in caches) // len(caches))


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) example indices: passes over a fresh permutation each, a pure function of the seed."""
    rng = np.random.default_rng([seed, 0x5EED])
    if num_examples < batch_size:  # fewer examples than a batch: draw with replacement
        return rng.integers(0, num_examples, size=(steps, batch_size))
    per_pass = num_examples // batch_size
    passes = math.ceil(steps / per_pass)
    order = np.concatenate([rng.permutation(num_examples)[: per_pass * batch_size] for _ in range(passes)])
    return order.reshape(-1, batch_size)[:steps]


def train_and_score(
    cfg: Config, vocab_size: int, learning_rate: float, seed: int, budget: Budget,
    train: Examples, tests: dict[int, Examples], mlp: bool = False,
) -> RunResult:
    """Train a fresh model of `cfg` on `train` at `learning_rate`, then score it on every test set."""
    prepare_process()
    started = time.perf_counter()
    device = resolve_device(cfg)
    torch.manual_seed(seed)
    model = build_probe_model(cfg, vocab_size, mlp).to(device)
    optimizer = make_adamw(model, cfg, learning_rate, device)
    first_test = tests[min(tests)]
    order = batch_order(len(train), budget.batch_size, budget.max_steps, seed)
    status, step, loss_value, curve = "completed", 0, float("nan"), []
    model.train()
    for step in range(1, budget.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step - 1, learning_rate, budget)
        rows = order[step - 1]
        idx = torch.from_numpy(train.inputs[rows]).to(device)
        targets = torch.from_numpy(train.labels[rows]).to(device)
        logits, _, _ = model(idx)
        loss = recall_loss(logits, targets)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            status = "diverged"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        optimizer.step()
        if step % budget.eval_interval == 0 or step == budget.max_steps:
            held_out = evaluate(model, first_test, device, budget.eval_examples)
            curve.append((step, held_out))
            if held_out > budget.target_accuracy:
                status = "early_stopped"
                break
    scores = {length: evaluate(model, examples, device) for length, examples in sorted(tests.items())}
    states = {length: measure_state_bytes(model, length, device) for length in sorted(tests)}
    shortest = min(tests)
    grows = measure_state_bytes(model, 2 * shortest, device) > states[shortest]
    return RunResult(
        accuracy=scores, state_bytes=states, state_grows=grows, train_steps=step, status=status, final_train_loss=loss_value,
        num_parameters=model.num_parameters(), wall_seconds=time.perf_counter() - started, curve=curve,
    )
