"""Corpora: a dataset's text split into train and validation, and what identifies it.

    corpus = load_corpus(cfg.data.dataset, cfg.data.val_fraction, cache_dir)
    corpus.train_text, corpus.val_text, corpus.fingerprint()

Datasets (`data.dataset`):
  python-stdlib    the running interpreter's standard-library .py files, tests excluded; split by file
  tinyshakespeare, wikitext-2, wikitext-103, enwik8
                   downloaded once (data/downloads.py); their canonical splits
  a path           a text file (split by characters), a directory or a glob of text files (split by file)
  hf:NAME[:CONFIG] a Hugging Face dataset (pip install datasets): its train/validation splits, column "text"
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_comparison.errors import UserError

STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
                                  "dist-packages", "__pycache__"})


@dataclass
class Corpus:
    """A dataset's text split into train and validation, and what identifies it."""

    name: str
    train_text: str
    val_text: str
    file_count: int
    num_bytes: int
    sha256: str
    split: str  # how train/val were chosen, e.g. "last 10% of characters"
    val_files: tuple[str, ...] = ()  # split by file: the names held out for validation

    def fingerprint(self) -> dict[str, Any]:
        return {"dataset": self.name, "file_count": self.file_count, "bytes": self.num_bytes,
                "sha256": self.sha256, "split": self.split}


def split_by_characters(name: str, text: str, val_fraction: float, file_count: int = 1) -> Corpus:
    """The first 1 - val_fraction of the characters train, the rest validation (nanoGPT's split)."""
    cut = int(len(text) * (1.0 - val_fraction))
    if cut == 0 or cut == len(text):
        raise UserError(f"dataset {name} has {len(text)} characters: too short to split into train and validation")
    data = text.encode("utf-8", "surrogatepass")
    return Corpus(name, text[:cut], text[cut:], file_count, len(data), hashlib.sha256(data).hexdigest(),
                  f"last {val_fraction:.0%} of characters")


def split_by_file(name: str, documents: Sequence[tuple[str, str]], val_fraction: float) -> Corpus:
    """Whole files to validation until ~val_fraction of the bytes, chosen by a hash of each file's
    name (deterministic, independent of the listing order); train and val each keep name order.

    `documents` are (relative name, text) pairs sorted by name. One file: split by characters.
    """
    if len(documents) < 2:
        return split_by_characters(name, "".join(text for _, text in documents), val_fraction, len(documents))
    sizes = {rel: len(text.encode("utf-8", "surrogatepass")) for rel, text in documents}
    total = sum(sizes.values())
    target = val_fraction * total
    in_val: set[str] = set()
    val_bytes = 0
    for rel in sorted(sizes, key=lambda rel: hashlib.sha256(rel.encode()).hexdigest()):
        if val_bytes + sizes[rel] <= target:
            in_val.add(rel)
            val_bytes += sizes[rel]
    if not in_val:  # every file is larger than the target: hold out the smallest
        in_val.add(min(sizes, key=lambda rel: (sizes[rel], rel)))
    digest = hashlib.sha256()
    for _, text in documents:
        digest.update(text.encode("utf-8", "surrogatepass"))
    train = "".join(text for rel, text in documents if rel not in in_val)
    val = "".join(text for rel, text in documents if rel in in_val)
    return Corpus(name, train, val, len(documents), total, digest.hexdigest(),
                  f"by file: {len(documents) - len(in_val)} train / {len(in_val)} validation files",
                  tuple(sorted(in_val)))


def _read_documents(root: Path, files: Sequence[Path], skip_undecodable: bool) -> list[tuple[str, str]]:
    """(name relative to root, text) of each file, sorted by name; binary files skipped or refused."""
    documents = []
    for path in files:
        text = _read_text(path, required=not skip_undecodable)
        if text is not None:
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
            documents.append((rel, text))
    return sorted(documents)


def _read_text(path: Path, required: bool) -> str | None:
    """A file's UTF-8 text; a binary or undecodable file is an error if required, else None."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    text = None
    if b"\0" not in data:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if text is None and required:
        raise UserError(f"{path} is not a UTF-8 text file (binary or another encoding)")
    return text


def _walk_files(root: Path, keep: Callable[[str], bool], skip_dirs: Callable[[str], bool]) -> list[Path]:
    """Files under root (symlinked folders not followed), pruning folders skip_dirs rejects."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not skip_dirs(d))
        found.extend(Path(folder) / f for f in sorted(files) if keep(f) and (Path(folder) / f).is_file())  # no FIFOs
    return found


# --- python-stdlib ---------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted; test folders, idlelib, turtledemo, site-packages excluded."""
    root = stdlib_root() if root is None else root
    return _walk_files(root, keep=lambda f: f.endswith(".py"),
                       skip_dirs=lambda d: d in STDLIB_EXCLUDED_DIRS or d.startswith("."))


def stdlib_corpus(val_fraction: float, files: Sequence[Path] | None = None, root: Path | None = None) -> Corpus:
    """The python-stdlib dataset (or the given subset of its files, for tests)."""
    root = stdlib_root() if root is None else root
    files = stdlib_files(root) if files is None else files
    documents = _read_documents(root, files, skip_undecodable=True)
    if not documents:
        raise UserError(f"no standard-library source files found under {root}")
    return split_by_file("python-stdlib", documents, val_fraction)


# --- local paths -----------------------------------------------------------------------------


def path_corpus(spec: str, val_fraction: float) -> Corpus:
    """A text file (split by characters), a directory of text files or a glob (split by file)."""
    path = Path(spec).expanduser()
    if path.is_file():
        text = _read_text(path, required=True)
        assert text is not None
        return split_by_characters(str(path), text, val_fraction)
    if path.is_dir():
        files = _walk_files(path, keep=lambda f: not f.startswith("."), skip_dirs=lambda d: d.startswith("."))
        root, what = path, f"directory {path}"
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        root, what = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path("."), f"glob {spec}"
    elif path.exists():
        raise UserError(f"data.dataset={spec!r} is not a regular file or a directory (a FIFO, socket or device?); "
                        "give a text file, a directory of text files or a glob")
    else:
        from transformer_comparison.data.downloads import REMOTE_DATASETS

        raise UserError(f"data.dataset={spec!r}: no such file or directory, and not a known dataset "
                        f"({', '.join(['python-stdlib', *REMOTE_DATASETS])}) or hf:NAME[:CONFIG]")
    documents = _read_documents(root, files, skip_undecodable=True)
    if not documents:
        raise UserError(f"data.dataset: no UTF-8 text files found in {what}")
    return split_by_file(str(spec), documents, val_fraction)


def corpus_from_splits(name: str, train: str, val: str, file_count: int, split: str) -> Corpus:
    """A Corpus whose bytes and sha256 are those of train + val."""
    content = (train + val).encode("utf-8", "surrogatepass")
    return Corpus(name, train, val, file_count, len(content), hashlib.sha256(content).hexdigest(), split)


# --- Hugging Face datasets -------------------------------------------------------------------


def hf_corpus(spec: str, val_fraction: float, cache_dir: Path) -> Corpus:
    """hf:NAME[:CONFIG]: the train and validation splits' "text" column, rows joined by newlines."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise UserError(f"data.dataset={spec!r} should look like hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(f"data.dataset={spec!r} needs the Hugging Face datasets package: pip install datasets") from None
    try:
        loaded = datasets.load_dataset(name, config or None, cache_dir=str(cache_dir / "hf"))
    except Exception as error:  # noqa: BLE001  (network, missing dataset, bad config: all the user's to fix)
        raise UserError(f"cannot load Hugging Face dataset {spec!r}: {' '.join(str(error).split())}") from None
    if "train" not in loaded:
        raise UserError(f"Hugging Face dataset {spec!r} has no train split (splits: {', '.join(loaded)})")
    train_rows = _text_column(loaded["train"], spec)
    if "validation" not in loaded:
        return split_by_characters(spec, "\n".join(train_rows), val_fraction, file_count=len(train_rows))
    val_rows = _text_column(loaded["validation"], spec)
    return corpus_from_splits(spec, "\n".join(train_rows), "\n".join(val_rows), len(train_rows) + len(val_rows),
                              "canonical train/validation")


def _text_column(split: Any, spec: str) -> list[str]:
    if "text" not in split.column_names:
        raise UserError(f"Hugging Face dataset {spec!r} has no 'text' column (columns: {', '.join(split.column_names)})")
    return [str(row) for row in split["text"]]
