"""Tokenizers, datasets, splits, fingerprints and the token cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_comparison import data
from transformer_comparison.config import DataConfig
from transformer_comparison.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    downloads,
    load_tokenizer,
    prepare_data,
    stdlib_corpus,
    stdlib_files,
    stdlib_root,
    token_cache,
    token_dtype,
    tokenizers,
)
from transformer_comparison.errors import UserError

SHARED_DATA = Path(os.environ.get("TCOMPARE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SAMPLE = "def f(x):\n    return x + 1  # ünïcödé ✓ 🐍\n\nclass A:\n    pass\n"


@pytest.fixture(autouse=True)
def _no_user_environment(monkeypatch):
    """Tests never read the user's data dir or cache, nor the network."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.CACHE_ENV, raising=False)

    def no_network(url, output_file, pooch):
        raise ConnectionError("network disabled in tests")

    monkeypatch.setattr(downloads, "make_downloader", lambda: no_network)


def data_config(tmp_path: Path, **values) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **values)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# --- tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([SAMPLE * 50, "the quick brown fox jumps over the lazy dog\n" * 50], vocab_size=300)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_and_save_load(kind, bpe, tmp_path):
    tokenizer = {"char": CharTokenizer.from_text(SAMPLE), "byte": ByteTokenizer(), "bpe": bpe}[kind]
    ids = tokenizer.encode(SAMPLE)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.encode_array(SAMPLE).tolist() == ids
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.name, loaded.vocab_size, loaded.identity) == (kind, tokenizer.vocab_size, tokenizer.identity)
    assert loaded.encode(SAMPLE) == ids


def test_bpe_encodes_long_texts_in_pieces_exactly(bpe):
    text = (SAMPLE + "    indented\n\n  \n" + "x = 1\n") * 3000
    pieces = list(tokenizers._chunks([text], size=1000))
    assert "".join(pieces) == text and len(pieces) > 100
    assert bpe.encode_array(text).tolist() == bpe.encode(text)


def test_bpe_compresses(bpe):
    assert bpe.vocab_size == 300
    assert len(bpe.encode(SAMPLE)) < len(SAMPLE.encode())


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1))
def test_char_and_byte_round_trip_any_text(text):
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    char = CharTokenizer.from_text(text)
    assert char.decode(char.encode_array(text).tolist()) == text


def test_char_vocabulary_is_sorted_and_unknown_characters_are_errors():
    tokenizer = CharTokenizer.from_text("cab", "ba")
    assert tokenizer.chars == "abc" and tokenizer.encode("cab") == [2, 0, 1]
    with pytest.raises(UserError) as error:
        tokenizer.encode("abz")
    assert "'z'" in one_line(error)
    with pytest.raises(UserError):
        tokenizer.encode_array("abz")


def test_byte_decode_replaces_invalid_utf8():
    assert ByteTokenizer().decode([0x61, 0xFF, 0x62]) == "a\ufffdb"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError) as error:
        load_tokenizer(tmp_path / "bad.json")
    assert "bad.json" in one_line(error)


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# --- python-stdlib ---------------------------------------------------------------------------


def test_stdlib_files_exclude_tests_and_are_sorted_and_deterministic():
    root = stdlib_root()
    files = stdlib_files()
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= names
    excluded = {"test", "tests", "idlelib", "turtledemo", "site-packages"}
    assert not [n for n in names if excluded & set(n.split("/")[:-1])]
    assert all(p.suffix == ".py" for p in files)
    assert files == stdlib_files()


def test_stdlib_split_by_file_with_fingerprint():
    root = stdlib_root()
    subset = [p for p in stdlib_files() if p.relative_to(root).parts[0] in {"json", "email", "asyncio"}]
    corpus = stdlib_corpus(0.2, files=subset)
    texts = {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in subset}
    names = sorted(texts)
    # every file lands whole in exactly one split, each split in name order
    assert corpus.val_files and set(corpus.val_files) < set(names)
    assert corpus.train_text == "".join(texts[n] for n in names if n not in corpus.val_files)
    assert corpus.val_text == "".join(texts[n] for n in names if n in corpus.val_files)
    total = sum(len(t.encode()) for t in texts.values())
    assert corpus.num_bytes == total and corpus.file_count == len(subset)
    assert 0.1 * total < len(corpus.val_text.encode()) <= 0.2 * total
    assert corpus.sha256 == hashlib.sha256("".join(texts[n] for n in sorted(texts)).encode()).hexdigest()
    again = stdlib_corpus(0.2, files=list(reversed(subset)))
    assert (again.train_text, again.val_text, again.sha256) == (corpus.train_text, corpus.val_text, corpus.sha256)


def test_python_stdlib_dataset_end_to_end(tmp_path):
    prepared = prepare_data(data_config(tmp_path))  # the default dataset, char level
    fp = prepared.fingerprint
    assert fp["dataset"] == "python-stdlib" and fp["tokenizer"] == "char"
    assert fp["file_count"] == len(stdlib_files()) and fp["bytes"] > 1_000_000
    assert fp["vocab_size"] == prepared.tokenizer.vocab_size > 90  # non-ASCII characters included
    assert (fp["train_tokens"], fp["val_tokens"]) == (len(prepared.train), len(prepared.val))
    assert 0.05 < fp["val_tokens"] / (fp["train_tokens"] + fp["val_tokens"]) <= 0.1
    assert isinstance(prepared.train, np.memmap) and prepared.train.dtype == np.uint16
    assert "import" in prepared.tokenizer.decode(prepared.val[:5000].tolist())


# --- local paths -----------------------------------------------------------------------------


def test_text_file_splits_by_characters(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "".join(chr(97 + i % 26) for i in range(1000))
    path.write_text(text)
    prepared = prepare_data(data_config(tmp_path, dataset=str(path), tokenizer="byte"))
    assert bytes(prepared.train.tolist()).decode() == text[:900]
    assert bytes(prepared.val.tolist()).decode() == text[900:]
    assert prepared.fingerprint["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def make_tree(root: Path, count: int = 10) -> dict[str, str]:
    texts = {f"sub{i % 3}/doc{i}.txt": f"document {i}\n" * (5 + i) for i in range(count)}
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("hidden\n")
    (root / "image.bin").write_bytes(b"\x89PNG\0\0binary")
    return texts


def test_directory_splits_by_file_and_skips_binary_and_hidden(tmp_path):
    texts = make_tree(tmp_path / "docs")
    prepared = prepare_data(data_config(tmp_path, dataset=str(tmp_path / "docs"), val_fraction=0.3))
    fp = prepared.fingerprint
    assert fp["file_count"] == len(texts) and fp["bytes"] == sum(len(t) for t in texts.values())
    train, val = (prepared.tokenizer.decode(a.tolist()) for a in (prepared.train, prepared.val))
    assert sorted(train.splitlines(True) + val.splitlines(True)) == sorted("".join(texts.values()).splitlines(True))
    for text in texts.values():
        assert (text in train) != (text in val)
    assert "hidden" not in train + val and "PNG" not in train + val


def test_glob_dataset(tmp_path):
    texts = make_tree(tmp_path / "docs")
    prepared = prepare_data(data_config(tmp_path, dataset=str(tmp_path / "docs" / "**" / "*.txt")))
    assert prepared.fingerprint["file_count"] == len(texts)
    prepared = prepare_data(data_config(tmp_path, dataset=str(tmp_path / "docs" / "sub1" / "*.txt")))
    assert prepared.fingerprint["file_count"] == len([n for n in texts if n.startswith("sub1/")])


@pytest.mark.parametrize("case", ["missing", "binary", "empty_dir", "empty_glob", "tiny"])
def test_bad_paths_name_the_path(tmp_path, case):
    target = tmp_path / "target"
    spec = str(target)
    if case == "binary":
        target.write_bytes(b"\0\1\2binary")
    elif case == "empty_dir":
        target.mkdir()
        (target / "blob").write_bytes(b"\xff\xfe\0")
    elif case == "empty_glob":
        spec = str(tmp_path / "nothing" / "*.txt")
    elif case == "tiny":
        target.write_text("x")
    with pytest.raises(UserError) as error:
        prepare_data(data_config(tmp_path, dataset=spec))
    assert spec in one_line(error)


def test_model_vocab_size_must_cover_the_tokenizer(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10)
    with pytest.raises(UserError) as error:
        prepare_data(data_config(tmp_path, dataset=str(path)), model_vocab_size=5)
    assert "model.vocab_size" in one_line(error)
    assert prepare_data(data_config(tmp_path, dataset=str(path)), model_vocab_size=10).tokenizer.vocab_size == 10


# --- the token cache -------------------------------------------------------------------------


def test_token_arrays_are_cached_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("hello world, the cache test\n" * 100)
    cfg = data_config(tmp_path, dataset=str(path))
    first = prepare_data(cfg)
    files = sorted((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 2 and not list((tmp_path / "cache" / "tokens").glob("*.tmp"))
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_encoding(self, text):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(CharTokenizer, "encode_array", no_encoding)
    second = prepare_data(cfg)
    assert np.array_equal(first.train, second.train) and first.fingerprint == second.fingerprint
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # a different tokenizer is a different cache entry
    monkeypatch.undo()
    prepare_data(data_config(tmp_path, dataset=str(path), tokenizer="byte"))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 4


def test_bpe_is_trained_once_and_cached(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(SAMPLE * 200)
    cfg = data_config(tmp_path, dataset=str(path), tokenizer="bpe", bpe_vocab_size=300)
    first = prepare_data(cfg)
    assert first.tokenizer.name == "bpe" and len(first.train) < len(SAMPLE * 180)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    second = prepare_data(cfg)
    assert second.tokenizer.identity == first.tokenizer.identity
    assert second.tokenizer.decode(second.val.tolist()) == first.tokenizer.decode(first.val.tolist())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env-cache"))
    assert data.resolve_cache_dir(None) == tmp_path / "env-cache"
    assert data.resolve_cache_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.resolve_cache_dir(None) == Path.home() / ".cache" / "transformer-comparison"


# --- verified caches and odd paths -------------------------------------------------------------


def test_a_damaged_token_cache_is_rebuilt_and_said(tmp_path, capsys):
    path = tmp_path / "t.txt"
    path.write_text("hello world, the cache test\n" * 100)
    cfg = data_config(tmp_path, dataset=str(path))
    clean = np.array(prepare_data(cfg).train)
    cached = max((tmp_path / "cache" / "tokens").glob("*.npy"), key=lambda p: p.stat().st_size)  # the train split's
    assert token_cache.digest_path(cached).exists()
    with cached.open("r+b") as handle:  # garbage ids that are still in range: only the checksum can tell
        handle.seek(-8, os.SEEK_END)
        handle.write(bytes([1, 0, 2, 0, 3, 0, 1, 0]))
    capsys.readouterr()
    again = prepare_data(cfg)
    assert np.array_equal(np.array(again.train), clean)
    err = capsys.readouterr().err
    assert str(cached) in err and "rebuilding" in err and "damaged" in err
    token_cache.digest_path(cached).unlink()  # no stored digest (an older version, or a crash): rebuilt too
    assert np.array_equal(np.array(prepare_data(cfg).train), clean)
    assert "no stored checksum" in capsys.readouterr().err and token_cache.digest_path(cached).exists()


def test_a_fifo_as_the_dataset_is_named(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError) as error:
        prepare_data(data_config(tmp_path, dataset=str(fifo)))
    assert "not a regular file" in one_line(error) and str(fifo) in one_line(error)
    folder = tmp_path / "docs"  # a FIFO inside a dataset directory is skipped, not read (which would hang)
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n" * 50)
    (folder / "b.txt").write_text("more text\n" * 50)
    os.mkfifo(folder / "pipe.txt")
    assert prepare_data(data_config(tmp_path, dataset=str(folder))).fingerprint["file_count"] == 2


def test_a_cache_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "blocker").write_text("x")
    path = tmp_path / "t.txt"
    path.write_text("abc" * 100)
    for cache_dir in (tmp_path / "blocker", tmp_path / "blocker" / "sub"):
        with pytest.raises(UserError) as error:
            prepare_data(DataConfig(dataset=str(path), cache_dir=str(cache_dir)))
        assert "data.cache_dir" in one_line(error) and "is a file" in one_line(error)
