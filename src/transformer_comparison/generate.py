"""`tcompare generate`: sample text from a trained run (temperature 0 is greedy decoding).

By default the prompt is prefilled into per-layer decoding caches and each new token costs one
cached step (docs/decoding.md). Once the caches hold context_length tokens they are rebuilt from the
last context_length // 2 tokens (positions restart at 0, as in the training windows), so no token is
ever predicted from more than the trained context, at amortised O(context) per token.
`--no_cache` instead recomputes the whole forward pass over the last context_length tokens at every
step. Both give the same tokens (greedy, up to floating-point rounding) while the sequence fits in
the context; beyond it, --no_cache predicts every token from exactly context_length tokens, the
cached path from between context_length // 2 and context_length.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from transformer_comparison.artifacts.run import IDENTITY_FILE, read_identity
from transformer_comparison.checkpoint import check_identity, load_checkpoint
from transformer_comparison.config import Config, load_config
from transformer_comparison.data import Tokenizer, load_tokenizer
from transformer_comparison.errors import UserError
from transformer_comparison.model import GPT
from transformer_comparison.numerics import prepare_process
from transformer_comparison.resume import flat_config

MAX_NEW_TOKENS = 1_000_000  # about a quarter of an hour of CPU decoding of a small model; more is a typo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, metavar="DIR", help="a run directory written by tcompare train")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_cache", action="store_true",
                        help="recompute the full forward pass over the last context_length tokens for every token "
                             "(default: decode from key/value caches or recurrent states)")


def load_run(run_dir: Path) -> tuple[GPT, Tokenizer, Config]:
    """The trained model (eval mode, CPU), its tokenizer and config, from a run directory; its
    checkpoint verified (checksum, and run id and config against run.json)."""
    from transformer_comparison.model import build_model

    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is a file; give a run directory written by tcompare train")
    for name in ("config.yaml", "tokenizer.json", "checkpoints/latest.pt"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a finished tcompare run: {name} is missing")
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    state = load_checkpoint(checkpoint)  # verified against its checksum
    if (run_dir / IDENTITY_FILE).is_file():  # and it is this run's, trained with this config
        check_identity(state, checkpoint, read_identity(run_dir).run_id, flat_config(cfg))
    model = build_model(cfg, cfg.model.vocab_size or tokenizer.vocab_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"the checkpoint in {run_dir} does not match its config.yaml ({str(error).splitlines()[0]})") from None
    return model.eval(), tokenizer, cfg


@torch.no_grad()
def sample(
    model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
    generator: torch.Generator, use_cache: bool = True,
) -> torch.Tensor:
    """Append max_new_tokens tokens to idx (batch, n).

    use_cache: decode from the model's caches (see the module docstring for what happens beyond the
    context); otherwise recompute the forward pass over the last context_length tokens each step.
    """
    context = model.config.context_length
    caches = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _, _ = model(idx[:, -context:])
        elif caches is None or caches[0].position >= context:
            keep = context if caches is None else max(1, context // 2)
            caches = model.new_caches()
            logits, _, _ = model(idx[:, -keep:], caches=caches)
        else:
            logits, _, _ = model(idx[:, -1:], caches=caches)
        idx = torch.cat((idx, next_token(logits[:, -1, :], temperature, top_k, generator)), dim=1)
    return idx


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max_new_tokens must be between 0 and {MAX_NEW_TOKENS:,}, got {args.max_new_tokens:,}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be >= 1, got {args.top_k}")
    prepare_process()
    model, tokenizer, _ = load_run(args.run)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty after tokenisation; give at least one character")
    generator = torch.Generator().manual_seed(args.seed)
    out = sample(model, torch.tensor([prompt_ids]), args.max_new_tokens, args.temperature, args.top_k, generator,
                 use_cache=not args.no_cache)
    print(tokenizer.decode(out[0].tolist()))
    return 0
