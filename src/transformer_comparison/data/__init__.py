"""Text corpora, tokenizers and the memory-mapped token arrays training reads.

    prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size)
    prepared.train, prepared.val      # 1-D uint16/uint32 memmaps of token ids
    prepared.tokenizer.decode(ids)    # char | byte | bpe
    prepared.fingerprint              # what exactly was trained on

Datasets (`data.dataset`):
  python-stdlib    the running interpreter's standard-library .py files, tests excluded; split by file
  tinyshakespeare  char-rnn's text; split by characters (first 1 - val_fraction train: nanoGPT's split)
  wikitext-2, wikitext-103 (raw), enwik8
                   downloaded once into the cache (or read from $TCOMPARE_DATA_DIR), sha256/size
                   checked; their canonical train/validation splits (enwik8: bytes 0-90M / 90M-95M)
  a path           a text file (split by characters), a directory or a glob of text files (split by file)
  hf:NAME[:CONFIG] a Hugging Face dataset (pip install datasets): its train/validation splits, column "text"

Everything derived is cached under the cache dir (data.cache_dir, else $TCOMPARE_CACHE, else
~/.cache/transformer-comparison): downloads/, tokenizers/ (BPE), tokens/ (.npy token arrays keyed by
the split's sha256 and the tokenizer's identity, checked against a stored digest on every use), each
written atomically (temporary file + os.replace).

One job per module: cache.py (where), tokenizers.py, corpora.py (splits, python-stdlib, paths,
Hugging Face), downloads.py (named datasets through pooch), token_cache.py; this module ties them
together and re-exports what other modules import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transformer_comparison.data.cache import CACHE_ENV, DATA_DIR_ENV, resolve_cache_dir, sha256_text
from transformer_comparison.data.corpora import (
    Corpus,
    corpus_from_splits,
    hf_corpus,
    path_corpus,
    split_by_characters,
    split_by_file,
    stdlib_corpus,
    stdlib_files,
    stdlib_root,
)
from transformer_comparison.data.downloads import REMOTE_DATASETS, RemoteDataset, fetch, remote_corpus
from transformer_comparison.data.token_cache import token_dtype, tokenize_cached
from transformer_comparison.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)
from transformer_comparison.errors import UserError

__all__ = [
    "BPETokenizer", "ByteTokenizer", "CACHE_ENV", "CharTokenizer", "Corpus", "DATA_DIR_ENV", "PreparedData",
    "REMOTE_DATASETS", "RemoteDataset", "Tokenizer", "build_tokenizer", "corpus_from_splits", "fetch", "hf_corpus",
    "load_corpus", "load_tokenizer", "path_corpus", "prepare_data", "remote_corpus", "resolve_cache_dir",
    "sha256_text", "split_by_characters", "split_by_file", "stdlib_corpus", "stdlib_files", "stdlib_root",
    "token_dtype", "tokenize_cached", "tokenizer_from_json",
]


def load_corpus(dataset: str, val_fraction: float, cache_dir: Path) -> Corpus:
    """Dispatch on data.dataset: a built-in name, hf:..., or a path/glob."""
    if dataset == "python-stdlib":
        return stdlib_corpus(val_fraction)
    if dataset in REMOTE_DATASETS:
        return remote_corpus(dataset, val_fraction, cache_dir)
    if dataset.startswith("hf:"):
        return hf_corpus(dataset, val_fraction, cache_dir)
    return path_corpus(dataset, val_fraction)


@dataclass
class PreparedData:
    train: np.ndarray  # token ids, a read-only memmap
    val: np.ndarray
    tokenizer: Tokenizer
    fingerprint: dict[str, Any]


def prepare_data(data_cfg: Any, model_vocab_size: int | None = None) -> PreparedData:
    """Corpus -> tokenizer -> cached token arrays, for a config's `data` section."""
    cache_dir = resolve_cache_dir(data_cfg.cache_dir)
    corpus = load_corpus(data_cfg.dataset, data_cfg.val_fraction, cache_dir)
    if not corpus.train_text or not corpus.val_text:
        raise UserError(f"dataset {corpus.name} has an empty {'training' if not corpus.train_text else 'validation'} split")
    tokenizer = build_tokenizer(data_cfg.tokenizer, corpus, data_cfg.bpe_vocab_size, cache_dir)
    if model_vocab_size is not None and model_vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={model_vocab_size} is smaller than the {tokenizer.name} tokenizer's "
                        f"{tokenizer.vocab_size} symbols; use null or >= {tokenizer.vocab_size}")
    train = tokenize_cached(corpus.train_text, tokenizer, cache_dir)
    val = tokenize_cached(corpus.val_text, tokenizer, cache_dir)
    fingerprint = {**corpus.fingerprint(), "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                   "train_tokens": int(len(train)), "val_tokens": int(len(val))}
    return PreparedData(train, val, tokenizer, fingerprint)
