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
the split's sha256 and the tokenizer's identity), each written atomically (temporary file + os.replace).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transformer_comparison.errors import UserError

CACHE_ENV = "TCOMPARE_CACHE"
DATA_DIR_ENV = "TCOMPARE_DATA_DIR"
DOWNLOAD_TIMEOUT_SECONDS = 60
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
                                  "dist-packages", "__pycache__"})


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """data.cache_dir, else $TCOMPARE_CACHE, else ~/.cache/transformer-comparison."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "transformer-comparison"
    return Path(chosen).expanduser()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through a temporary file in the same folder, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# =============================================================================================
# Tokenizers


class Tokenizer(ABC):
    """encode/decode between text and ids in [0, vocab_size); `to_json` round-trips through load_tokenizer."""

    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of a (long) text as a numpy array; subclasses make this fast."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"type": self.name, **self._state()}, ensure_ascii=False, sort_keys=True)

    def save(self, path: str | os.PathLike[str]) -> None:
        data = self.to_json().encode("utf-8")
        _atomic_write(Path(path), lambda stream: stream.write(data))

    @property
    def identity(self) -> str:
        """A short hash of the full tokenizer state: equal identities encode identically."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is the sorted set of characters of the corpus."""

    name = "char"

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise UserError("the char tokenizer needs a non-empty text to build its vocabulary")
        self._index = {ch: i for i, ch in enumerate(self.chars)}
        self._codepoints = _codepoints(self.chars)

    @classmethod
    def from_text(cls, *texts: str) -> CharTokenizer:
        return cls("".join(set().union(*map(set, texts))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError as error:
            raise self._unknown(error.args[0]) from None

    def encode_array(self, text: str) -> np.ndarray:
        points = _codepoints(text)
        ids = np.searchsorted(self._codepoints, points)
        found = ids < len(self._codepoints)
        found[found] = self._codepoints[ids[found]] == points[found]
        if not found.all():
            raise self._unknown(chr(points[np.argmin(found)]))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError:
            raise UserError(f"token id out of range for the char tokenizer ({self.vocab_size} symbols)") from None

    def _unknown(self, ch: str) -> UserError:
        return UserError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char tokenizer's vocabulary "
                         f"({self.vocab_size} characters of the training data)")

    def _state(self) -> dict[str, Any]:
        return {"chars": self.chars}


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class ByteTokenizer(Tokenizer):
    """The 256 UTF-8 byte values; decoding replaces invalid sequences with U+FFFD."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        except ValueError:
            raise UserError("token id out of range for the byte tokenizer (256 symbols)") from None

    def _state(self) -> dict[str, Any]:
        return {}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) from Hugging Face `tokenizers`, trained on the training split."""

    name = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        hf.train_from_iterator(_chunks(texts), trainer=trainer)
        return cls(hf)

    @classmethod
    def from_str(cls, serialized: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(serialized))

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text).ids)

    def encode_array(self, text: str) -> np.ndarray:
        encodings = self.hf.encode_batch(list(_chunks([text])))
        return np.fromiter((i for enc in encodings for i in enc.ids), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=False))

    def _state(self) -> dict[str, Any]:
        return {"tokenizer": json.loads(self.hf.to_str())}


_CUT = re.compile(r"\n(?=\S)")


def _chunks(texts: Sequence[str], size: int = 1 << 16) -> Iterator[str]:
    """Texts cut into pieces of about `size` characters, for batch encoding and training. Each cut
    follows a newline that precedes a non-space, where byte-level BPE's pre-tokenizer splits anyway,
    so encoding the pieces gives the ids of encoding the whole text."""
    for text in texts:
        start = 0
        while start < len(text):
            cut = _CUT.search(text, start + size)
            end = len(text) if cut is None else cut.end()
            yield text[start:end]
            start = end


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        state = json.loads(text)
        kind = state["type"]
        if kind == "char":
            return CharTokenizer(state["chars"])
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BPETokenizer.from_str(json.dumps(state["tokenizer"]))
    except Exception as error:  # noqa: BLE001  (bad JSON, missing keys, or the tokenizers library's own errors)
        raise UserError(f"not a saved tokenizer: {' '.join(str(error).split())}") from None
    raise UserError(f"unknown tokenizer type {kind!r}; valid: char, byte, bpe")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer written by Tokenizer.save (a run's tokenizer.json)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read tokenizer {path}: {error.strerror or error}") from None
    try:
        return tokenizer_from_json(text)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def build_tokenizer(kind: str, corpus: Corpus, bpe_vocab_size: int, cache_dir: Path) -> Tokenizer:
    """char: the characters of train + val; byte: fixed; bpe: trained on train, cached by content + size."""
    if kind == "char":
        return CharTokenizer.from_text(corpus.train_text, corpus.val_text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        path = cache_dir / "tokenizers" / f"bpe-{sha256_text(corpus.train_text)[:20]}-{bpe_vocab_size}.json"
        if path.exists():
            try:
                return load_tokenizer(path)
            except UserError:
                pass  # a damaged cache entry: train again and overwrite it
        tokenizer = BPETokenizer.train([corpus.train_text], bpe_vocab_size)
        tokenizer.save(path)
        return tokenizer
    raise UserError(f"data.tokenizer={kind!r} is not a tokenizer; valid: char, byte, bpe")


# =============================================================================================
# Corpora


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
        found.extend(Path(folder) / f for f in sorted(files) if keep(f))
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
    else:
        raise UserError(f"data.dataset={spec!r}: no such file or directory, and not a known dataset "
                        f"({', '.join(['python-stdlib', *REMOTE_DATASETS])}) or hf:NAME[:CONFIG]")
    documents = _read_documents(root, files, skip_undecodable=True)
    if not documents:
        raise UserError(f"data.dataset: no UTF-8 text files found in {what}")
    return split_by_file(str(spec), documents, val_fraction)


# --- downloads -------------------------------------------------------------------------------


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


def _check_file(source: RemoteDataset, path: Path) -> str | None:
    """Why the file is not the expected one, or None if it is."""
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        return f"{path} has {size:,} bytes, expected {source.size:,}"
    if source.sha256 is not None:
        digest = _file_sha256(path)
        if digest != source.sha256:
            return f"{path} has sha256 {digest}, expected {source.sha256}"
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(source: RemoteDataset, cache_dir: Path) -> Path:
    """The dataset file: from $TCOMPARE_DATA_DIR, else the cache, else downloaded into the cache."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        candidate = Path(data_dir).expanduser() / source.filename
        if candidate.is_file():
            problem = _check_file(source, candidate)
            if problem:
                raise UserError(f"{problem} (from ${DATA_DIR_ENV}); replace or remove it")
            return candidate
    cached = cache_dir / "downloads" / source.filename
    if cached.is_file() and _check_file(source, cached) is None:
        return cached
    return _download(source, cached)


def _download(source: RemoteDataset, target: Path) -> Path:
    errors = []
    for url in source.urls:
        print(f"downloading {source.name} from {url}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:  # noqa: S310
                _atomic_write(target, lambda stream: _copy(response, stream))
        except (urllib.error.URLError, OSError, ValueError) as error:
            errors.append(f"{url}: {getattr(error, 'reason', None) or error}")
            continue
        problem = _check_file(source, target)
        if problem is None:
            return target
        target.unlink(missing_ok=True)
        errors.append(f"{url}: {problem}")
    raise UserError(f"could not download {source.name} ({'; '.join(errors)}); download it yourself and pass "
                    f"data.dataset=/path/to/file, or put it in ${DATA_DIR_ENV} as {source.filename}")


def _copy(response: Any, stream: io.BufferedWriter) -> None:
    for block in iter(lambda: response.read(1 << 20), b""):
        stream.write(block)


def corpus_from_splits(name: str, train: str, val: str, file_count: int, split: str) -> Corpus:
    """A Corpus whose bytes and sha256 are those of train + val."""
    content = (train + val).encode("utf-8", "surrogatepass")
    return Corpus(name, train, val, file_count, len(content), hashlib.sha256(content).hexdigest(), split)


def remote_corpus(name: str, val_fraction: float, cache_dir: Path) -> Corpus:
    source = REMOTE_DATASETS[name]
    path = fetch(source, cache_dir)
    try:
        train, val, file_count = source.read(path, val_fraction)
    except (OSError, UnicodeDecodeError, KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read {name} from {path}: {error}; delete it to download it again") from None
    split = f"last {val_fraction:.0%} of characters" if source.read is _read_single_text else "canonical train/validation"
    return corpus_from_splits(name, train, val, file_count, split)


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


def load_corpus(dataset: str, val_fraction: float, cache_dir: Path) -> Corpus:
    """Dispatch on data.dataset: a built-in name, hf:..., or a path/glob."""
    if dataset == "python-stdlib":
        return stdlib_corpus(val_fraction)
    if dataset in REMOTE_DATASETS:
        return remote_corpus(dataset, val_fraction, cache_dir)
    if dataset.startswith("hf:"):
        return hf_corpus(dataset, val_fraction, cache_dir)
    return path_corpus(dataset, val_fraction)


# =============================================================================================
# Token arrays


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_cached(text: str, tokenizer: Tokenizer, cache_dir: Path) -> np.ndarray:
    """The ids of `text` as a read-only memmap, tokenised once and cached by content + tokenizer."""
    dtype = token_dtype(tokenizer.vocab_size)
    path = cache_dir / "tokens" / f"{sha256_text(text)[:24]}-{tokenizer.name}-{tokenizer.identity}-{dtype.name}.npy"
    if path.exists():
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            pass  # a damaged cache entry: tokenise again
    ids = tokenizer.encode_array(text).astype(dtype)
    _atomic_write(path, lambda stream: np.save(stream, ids, allow_pickle=False))
    return np.load(path, mmap_mode="r")


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
