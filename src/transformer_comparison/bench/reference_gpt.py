"""The peer `tcompare bench train` measures the trainer against: nanoGPT's model and training step,
written here so that both run on the same machine, data, optimiser and batch.

nanoGPT's architecture (Karpathy, model.py): learned token and position embeddings (tied head),
pre-LayerNorm blocks of causal self-attention through `F.scaled_dot_product_attention(is_causal=True)`
(torch's fused kernel) and a 4x GELU MLP; AdamW with weight decay on matrices only, gradient
clipping, the same cosine schedule. One process trains it for a number of steps and reports the
time of each logging window, measured exactly as the trainer measures its own (`step_time_ms`).
It runs with glibc's allocator defaults, as nanoGPT does, unless the case asks it to keep freed
memory as the trainer does (`allocator.keep_freed_memory`).

    python -m transformer_comparison.bench.reference_gpt --case JSON
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from transformer_comparison.bench.common import child_main

RESULT_PREFIX = "TCOMPARE_TRAIN_BENCH_RESULT "


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(batch, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, n, d))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = SelfAttention(d_model, heads, bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, context: int, d_model: int, heads: int, layers: int, bias: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_reference(case: dict[str, Any]) -> dict[str, Any]:
    """Train for case["steps"] steps; the mean step time of each window of case["log_interval"] steps."""
    from transformer_comparison.allocator import keep_freed_memory
    from transformer_comparison.config import validate_config
    from transformer_comparison.data import prepare_data
    from transformer_comparison.numerics import flush_subnormals

    torch.set_num_threads(case["threads"])
    flush_subnormals()
    kept = case.get("keep_freed_memory", False) and keep_freed_memory()
    cfg = validate_config(case["config"])
    m, t = cfg.model, cfg.training
    data = prepare_data(cfg.data, m.vocab_size)
    torch.manual_seed(t.seed)
    model = NanoGPT(m.vocab_size or data.tokenizer.vocab_size, m.context_length, m.d_model, m.num_heads, m.num_layers, m.bias)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
                                  lr=t.learning_rate, betas=(t.beta1, t.beta2))
    tokens, ctx, batch = data.train, m.context_length, t.batch_size
    windows, window_start, loss_value = [], time.perf_counter(), math.nan
    for step in range(case["steps"]):
        progress = min(1.0, max(0, step - t.warmup_steps) / max(1, case["steps"] - t.warmup_steps))
        lr = t.learning_rate * (step + 1) / (t.warmup_steps + 1) if step < t.warmup_steps else (
            t.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_learning_rate))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = np.random.default_rng([t.seed, step]).integers(0, len(tokens) - ctx - 1, size=batch)
        chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(ctx + 1)].astype(np.int64))
        loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % case["log_interval"] == 0:
            loss_value = loss.item()  # the host sync of a logging step, as in the trainer
            now = time.perf_counter()
            windows.append(1000 * (now - window_start) / case["log_interval"])
            window_start = now
    return {"status": "ok", "window_step_ms": windows, "final_train_loss": loss_value, "keeps_freed_memory": kept,
            "num_parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    return child_main("train nanoGPT's model for bench train", RESULT_PREFIX, train_reference, argv)


if __name__ == "__main__":
    sys.exit(main())
