"""Validation loss and attention entropy on fixed windows of the validation split.

    starts = validation_windows(data.val, cfg)       # fixed start offsets (the same at every evaluation)
    loss = evaluate(model, data.val, starts, cfg, rt)
    entropy = attention_entropy(model, data.val, starts, cfg, rt)   # layers x heads, or None

Used by the trainer, `tcompare eval` (windows_to_batch) and anything else that scores a model on
token windows; none of them imports the trainer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from transformer_comparison.config import Config
from transformer_comparison.errors import UserError
from transformer_comparison.runtime import Runtime, autocast

EVAL_BATCH_WINDOWS = 64  # validation windows per forward pass
ENTROPY_PROBE_WINDOWS = 8  # validation windows of the fixed attention-entropy probe


def validation_windows(tokens: np.ndarray, cfg: Config) -> np.ndarray:
    """Start offsets of the fixed validation windows: all non-overlapping context windows, or a fixed sample."""
    ctx = cfg.model.context_length
    starts = np.arange((len(tokens) - 1) // ctx) * ctx
    if len(starts) == 0:
        raise UserError(f"the validation split ({len(tokens)} tokens) is shorter than one context window ({ctx + 1})")
    if cfg.training.eval_batches is not None:
        wanted = cfg.training.eval_batches * cfg.training.batch_size
        if wanted < len(starts):
            starts = np.sort(np.random.default_rng(cfg.training.seed).choice(starts, wanted, replace=False))
    return starts


def windows_to_batch(tokens: np.ndarray, starts: np.ndarray, ctx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[s : s + ctx] and targets one token later, for each start s."""
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(ctx + 1)].astype(np.int64)).to(device)
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, starts: np.ndarray, cfg: Config, rt: Runtime) -> float:
    """Mean next-token loss over the fixed validation windows (sharded over ranks, summed exactly)."""
    model.eval()
    ctx = cfg.model.context_length
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss sum, window count
    mine = starts[rt.rank :: rt.world_size]
    for begin in range(0, len(mine), EVAL_BATCH_WINDOWS):
        x, y = windows_to_batch(tokens, mine[begin : begin + EVAL_BATCH_WINDOWS], ctx, rt.device)
        with autocast(rt):
            _, loss, _ = model(x, y)
        total += torch.stack((loss.double() * len(x), torch.tensor(float(len(x)), device=rt.device, dtype=torch.float64)))
    if rt.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def attention_entropy(model: torch.nn.Module, tokens: np.ndarray, starts: np.ndarray, cfg: Config, rt: Runtime) -> list[list[float]] | None:
    """Mean entropy (nats) over queries of each layer and head, on a fixed validation probe; None
    when the mechanism has no attention distribution."""
    model.eval()
    x, _ = windows_to_batch(tokens, starts[:ENTROPY_PROBE_WINDOWS], cfg.model.context_length, rt.device)
    with autocast(rt):
        _, _, entropy = model(x, return_entropy=True)
    model.train()
    return None if entropy is None else entropy.float().mean(dim=(1, 3)).tolist()
