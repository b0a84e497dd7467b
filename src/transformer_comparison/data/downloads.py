"""Named datasets with a canonical source: fetched once through pooch, checked, cached.

    path = fetch(REMOTE_DATASETS["tinyshakespeare"], cache_dir)   # cache_dir/downloads/tinyshakespeare.txt

A copy in $TCOMPARE_DATA_DIR (same file name) is used instead of downloading, after the same checks.
pooch downloads to a temporary file beside the target, verifies the sha256 (where one is known) and
only then moves it into place, so a cache never holds a partial or wrong file; where no digest could
be confirmed (mirrors re-pack the archive) the size is checked instead, and enwik8's content digest
on reading. Tests replace `make_downloader` with a fake (nothing here touches the network otherwise).
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pooch

from transformer_comparison.data.cache import DATA_DIR_ENV, file_sha256
from transformer_comparison.data.corpora import Corpus, corpus_from_splits
from transformer_comparison.errors import UserError

DOWNLOAD_TIMEOUT_SECONDS = 60
pooch.get_logger().setLevel("WARNING")  # we say what we download ourselves, once


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset file with a canonical source, its checks, and how to split it."""

    name: str
    filename: str  # the name in the cache and in $TCOMPARE_DATA_DIR
    urls: tuple[str, ...]  # tried in order
    sha256: str | None  # of the file; None where no digest could be confirmed (then size is checked)
    size: int | None
    read: Callable[[Path, float], tuple[str, str, int]] = field(repr=False)  # -> (train, val, file_count)


def _read_single_text(path: Path, val_fraction: float) -> tuple[str, str, int]:
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:], 1


def _wikitext_reader(folder: str) -> Callable[[Path, float], tuple[str, str, int]]:
    def read(path: Path, val_fraction: float) -> tuple[str, str, int]:
        with zipfile.ZipFile(path) as archive:
            train = archive.read(f"{folder}/wiki.train.raw").decode("utf-8")
            val = archive.read(f"{folder}/wiki.valid.raw").decode("utf-8")
        return train, val, 2

    return read


ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # the unzipped 10^8 bytes


def _read_enwik8(path: Path, val_fraction: float) -> tuple[str, str, int]:
    """The standard byte split: 90M train, the next 5M validation (the last 5M are the test set)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("enwik8")
    if hashlib.sha256(data).hexdigest() != ENWIK8_SHA256:
        raise UserError(f"{path} does not hold the original enwik8 (sha256 of its content differs); delete it")
    return data[:90_000_000].decode("utf-8", "replace"), data[90_000_000:95_000_000].decode("utf-8", "replace"), 1


REMOTE_DATASETS: dict[str, RemoteDataset] = {
    "tinyshakespeare": RemoteDataset(
        "tinyshakespeare", "tinyshakespeare.txt",
        ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394, _read_single_text),
    # The raw (untokenised) WikiText releases; Salesforce's S3 bucket moved to wikitext.smerity.com.
    "wikitext-2": RemoteDataset(
        "wikitext-2", "wikitext-2-raw-v1.zip",
        ("https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
         "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"),
        "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", 4_721_645, _wikitext_reader("wikitext-2-raw")),
    "wikitext-103": RemoteDataset(
        "wikitext-103", "wikitext-103-raw-v1.zip",
        ("https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
         "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"),
        None, 191_984_949, _wikitext_reader("wikitext-103-raw")),
    # The zip is re-packed by mirrors from time to time: its size is checked, the content's sha256 on reading.
    "enwik8": RemoteDataset(
        "enwik8", "enwik8.zip", ("http://mattmahoney.net/dc/enwik8.zip",), None, 36_445_475, _read_enwik8),
}


def check_file(source: RemoteDataset, path: Path) -> str | None:
    """Why the file is not the expected one, or None if it is."""
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        return f"{path} has {size:,} bytes, expected {source.size:,}"
    if source.sha256 is not None:
        digest = file_sha256(path)
        if digest != source.sha256:
            return f"{path} has sha256 {digest}, expected {source.sha256}"
    return None


def make_downloader() -> Callable[[str, str, Any], None]:
    """pooch's HTTP(S) downloader, quiet, with a timeout."""
    return pooch.HTTPDownloader(progressbar=False, timeout=DOWNLOAD_TIMEOUT_SECONDS)


def fetch(source: RemoteDataset, cache_dir: Path) -> Path:
    """The dataset file: from $TCOMPARE_DATA_DIR, else the cache, else downloaded into the cache."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        candidate = Path(data_dir).expanduser() / source.filename
        if candidate.is_file():
            problem = check_file(source, candidate)
            if problem:
                raise UserError(f"{problem} (from ${DATA_DIR_ENV}); replace or remove it")
            return candidate
    cached = cache_dir / "downloads" / source.filename
    if cached.is_file() and check_file(source, cached) is None:
        return cached
    return download(source, cached)


def download(source: RemoteDataset, target: Path) -> Path:
    """Download through pooch from each URL in turn until one gives the expected file."""
    errors = []
    target.unlink(missing_ok=True)  # a wrong cached copy: pooch would keep a file it cannot verify
    known_hash = f"sha256:{source.sha256}" if source.sha256 else None
    for url in source.urls:
        print(f"downloading {source.name} from {url}", file=sys.stderr)
        try:
            pooch.retrieve(url, known_hash=known_hash, fname=target.name, path=target.parent,
                           downloader=make_downloader(), progressbar=False)
        except Exception as error:  # noqa: BLE001  (network, HTTP status, digest mismatch: try the next URL)
            errors.append(f"{url}: {' '.join(str(error).split())[:200]}")
            continue
        problem = check_file(source, target)
        if problem is None:
            return target
        target.unlink(missing_ok=True)
        errors.append(f"{url}: {problem}")
    raise UserError(f"could not download {source.name} ({'; '.join(errors)}); download it yourself and pass "
                    f"data.dataset=/path/to/file, or put it in ${DATA_DIR_ENV} as {source.filename}")


def remote_corpus(name: str, val_fraction: float, cache_dir: Path) -> Corpus:
    source = REMOTE_DATASETS[name]
    path = fetch(source, cache_dir)
    try:
        train, val, file_count = source.read(path, val_fraction)
    except (OSError, UnicodeDecodeError, KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read {name} from {path}: {error}; delete it to download it again") from None
    split = f"last {val_fraction:.0%} of characters" if source.read is _read_single_text else "canonical train/validation"
    return corpus_from_splits(name, train, val, file_count, split)
