"""Tokenizers, datasets, splits, fingerprints and the token cache."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_comparison import data
from transformer_comparison.config import DataConfig
from transformer_comparison.data import downloads, token_cache, tokenizers
from transformer_comparison.data import (
    REMOTE_DATASETS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    RemoteDataset,
    fetch,
    load_tokenizer,
    prepare_data,
    split_by_characters,
    stdlib_corpus,
    stdlib_files,
    stdlib_root,
    token_dtype,
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


# --- named downloads -------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").is_file(), reason="no shared tinyshakespeare.txt")
def test_tinyshakespeare_from_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(SHARED_DATA))
    prepared = prepare_data(data_config(tmp_path, dataset="tinyshakespeare"))
    fp = prepared.fingerprint
    assert (fp["train_tokens"], fp["val_tokens"], fp["vocab_size"]) == (1_003_854, 111_540, 65)
    assert fp["sha256"] == REMOTE_DATASETS["tinyshakespeare"].sha256 and fp["bytes"] == 1_115_394
    assert prepared.tokenizer.decode(prepared.train[:9].tolist()) == "First Cit"


def test_download_failure_says_what_to_do(tmp_path):
    with pytest.raises(UserError) as error:
        prepare_data(data_config(tmp_path, dataset="tinyshakespeare"))
    message = one_line(error)
    assert "could not download tinyshakespeare" in message and "network disabled" in message
    assert "data.dataset=/path/to/file" in message and "TCOMPARE_DATA_DIR" in message


def fake_source(content: bytes, **changes) -> RemoteDataset:
    values = {"name": "fake", "filename": "fake.txt", "urls": ("https://example.invalid/fake.txt",),
              "sha256": hashlib.sha256(content).hexdigest(), "size": len(content), "read": downloads._read_single_text}
    return RemoteDataset(**{**values, **changes})


def fake_downloader(content: bytes, calls: list):
    """A pooch downloader that serves `content` for every URL and records the calls."""

    def download(url, output_file, pooch):
        calls.append(url)
        Path(output_file).write_bytes(content) if not hasattr(output_file, "write") else output_file.write(content)

    return download


def test_download_is_checked_and_cached(tmp_path, monkeypatch):
    content = b"some downloaded text\n" * 10
    calls = []
    monkeypatch.setattr(downloads, "make_downloader", lambda: fake_downloader(content, calls))
    path = fetch(fake_source(content), tmp_path)
    assert path == tmp_path / "downloads" / "fake.txt" and path.read_bytes() == content
    assert fetch(fake_source(content), tmp_path) == path and len(calls) == 1  # the cached copy is reused

    with pytest.raises(UserError) as error:  # a corrupted download is refused and not kept
        fetch(fake_source(content, sha256="0" * 64, filename="other.txt"), tmp_path)
    assert "other.txt" in one_line(error) and not (tmp_path / "downloads" / "other.txt").exists()
    assert not [p for p in (tmp_path / "downloads").iterdir() if p.name != "fake.txt"]  # no partial files


def test_download_tries_the_next_url_and_checks_the_size(tmp_path, monkeypatch):
    content = b"0123456789" * 5
    calls = []

    def first_fails(url, output_file, pooch):
        if "first" in url:
            calls.append(url)
            raise ConnectionError("first mirror is down")
        fake_downloader(content, calls)(url, output_file, pooch)

    monkeypatch.setattr(downloads, "make_downloader", lambda: first_fails)
    source = fake_source(content, sha256=None, urls=("https://first.invalid/f", "https://second.invalid/f"))
    assert fetch(source, tmp_path).read_bytes() == content and len(calls) == 2
    with pytest.raises(UserError) as error:  # no digest known: the size is checked instead
        fetch(fake_source(content, sha256=None, size=7, filename="sized.txt"), tmp_path)
    assert "expected 7" in one_line(error) and not (tmp_path / "downloads" / "sized.txt").exists()


def test_data_dir_copy_is_checked(tmp_path, monkeypatch):
    (tmp_path / "fake.txt").write_bytes(b"not what was expected")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError) as error:
        fetch(fake_source(b"the real content"), tmp_path / "cache")
    assert "fake.txt" in one_line(error)


def test_hf_datasets_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError) as error:
        prepare_data(data_config(tmp_path, dataset="hf:wikitext:wikitext-2-raw-v1"))
    assert "pip install datasets" in one_line(error)


def test_split_by_characters_is_nanogpt_split():
    corpus = split_by_characters("x", "a" * 95 + "b" * 5, 0.05)
    assert (corpus.train_text, corpus.val_text) == ("a" * 95, "b" * 5)


def test_wikitext_archive_uses_its_own_splits(tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("wikitext-2-raw/wiki.train.raw", " = Title = \n train text \n")
        zf.writestr("wikitext-2-raw/wiki.valid.raw", " valid text \n")
        zf.writestr("wikitext-2-raw/wiki.test.raw", " test text \n")
    source = fake_source(archive.read_bytes(), name="wikitext-2", filename=archive.name,
                         read=downloads._wikitext_reader("wikitext-2-raw"))
    monkeypatch.setitem(REMOTE_DATASETS, "wikitext-2", source)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    prepared = prepare_data(data_config(tmp_path, dataset="wikitext-2", tokenizer="byte"))
    assert prepared.tokenizer.decode(prepared.val.tolist()) == " valid text \n"
    assert prepared.fingerprint["split"] == "canonical train/validation"


class FakeSplit:
    def __init__(self, rows):
        self.column_names = ["text"]
        self.rows = rows

    def __getitem__(self, column):
        return list(self.rows)


def test_hf_dataset_with_a_fake_datasets_module(tmp_path, monkeypatch):
    import types

    calls = []

    def load_dataset(name, config, cache_dir):
        calls.append((name, config))
        return {"train": FakeSplit(["a b c", "d e f"]), "validation": FakeSplit(["g h"])}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepared = prepare_data(data_config(tmp_path, dataset="hf:someone/corpus:small"))
    assert calls == [("someone/corpus", "small")]
    assert prepared.tokenizer.decode(prepared.train.tolist()) == "a b c\nd e f"
    assert prepared.tokenizer.decode(prepared.val.tolist()) == "g h"
    assert prepared.fingerprint["dataset"] == "hf:someone/corpus:small" and prepared.fingerprint["file_count"] == 3


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
