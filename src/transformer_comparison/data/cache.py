"""Where derived data lives, and the text digest that keys it.

data.cache_dir, else $TCOMPARE_CACHE, else ~/.cache/transformer-comparison, holding downloads/,
tokenizers/ (BPE) and tokens/ (token arrays), each file written atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from transformer_comparison.errors import UserError

CACHE_ENV = "TCOMPARE_CACHE"
DATA_DIR_ENV = "TCOMPARE_DATA_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """data.cache_dir, else $TCOMPARE_CACHE, else ~/.cache/transformer-comparison; a UserError if it is a file."""
    chosen = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "transformer-comparison").expanduser()
    for folder in (chosen, *chosen.parents):
        if folder.exists():
            if not folder.is_dir():
                source = "data.cache_dir" if cache_dir else f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the cache"
                raise UserError(f"{source} {chosen}: {folder} is a file, not a directory; give a directory for the data cache")
            break
    return chosen


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
