"""Named downloads (through pooch, faked: no network) and Hugging Face datasets (a fake module)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from tests.test_data import SHARED_DATA, _no_user_environment, data_config, one_line  # noqa: F401  (autouse fixture)
from transformer_comparison import data
from transformer_comparison.data import REMOTE_DATASETS, RemoteDataset, downloads, fetch, prepare_data, split_by_characters
from transformer_comparison.errors import UserError

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
