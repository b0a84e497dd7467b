"""Token arrays, tokenised once and cached as .npy files that are checked every time they are used.

    ids = tokenize_cached(text, tokenizer, cache_dir)   # a read-only memmap of uint16/uint32 ids

An entry is cache_dir/tokens/<sha256 of the text>-<tokenizer>-<identity>-<dtype>.npy, with the
sha256 of the .npy file itself beside it (<name>.npy.sha256), written after the array. On use the
file is hashed again (about 2 s per GB): an entry whose bytes changed (a disk error, an edit, a
partial copy) or that has no digest (written by an older version, or a crash between the two
writes) is rebuilt from the source text, and the rebuild is said on stderr. Training therefore
never runs on token ids that are not the tokenisation of the text its fingerprint names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from transformer_comparison.artifacts.io import write_bytes_atomic, write_text_atomic
from transformer_comparison.data.cache import file_sha256, sha256_text
from transformer_comparison.data.tokenizers import Tokenizer

DIGEST_SUFFIX = ".sha256"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_path(text: str, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    dtype = token_dtype(tokenizer.vocab_size)
    return cache_dir / "tokens" / f"{sha256_text(text)[:24]}-{tokenizer.name}-{tokenizer.identity}-{dtype.name}.npy"


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def tokenize_cached(text: str, tokenizer: Tokenizer, cache_dir: Path) -> np.ndarray:
    """The ids of `text` as a read-only memmap, tokenised once and cached by content + tokenizer."""
    path = cache_path(text, tokenizer, cache_dir)
    if path.exists():
        problem = cache_problem(path)
        if problem is None:
            try:
                return np.load(path, mmap_mode="r")
            except (ValueError, OSError) as error:
                problem = f"it is not a readable array ({error})"
        print(f"token cache {path}: {problem}; rebuilding it from the source text", file=sys.stderr)
    ids = tokenizer.encode_array(text).astype(token_dtype(tokenizer.vocab_size))
    write_bytes_atomic(path, lambda stream: np.save(stream, ids, allow_pickle=False))
    write_text_atomic(digest_path(path), file_sha256(path) + "\n")
    return np.load(path, mmap_mode="r")


def cache_problem(path: Path) -> str | None:
    """Why a cached array cannot be trusted, or None when its bytes match the stored digest."""
    try:
        stored = digest_path(path).read_text().strip()
    except OSError:
        return "it has no stored checksum"
    if file_sha256(path) != stored:
        return "its contents do not match the checksum stored with it (damaged)"
    return None
