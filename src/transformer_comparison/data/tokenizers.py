"""Tokenizers: char, byte and byte-level BPE, saved as JSON and loaded back by `load_tokenizer`.

    tokenizer = build_tokenizer("char", corpus, bpe_vocab_size, cache_dir)
    ids = tokenizer.encode_array(text); text = tokenizer.decode(ids)
    tokenizer.identity        # a hash of the full state: equal identities encode identically
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transformer_comparison.artifacts.io import write_text_atomic
from transformer_comparison.data.cache import sha256_text
from transformer_comparison.errors import UserError

if TYPE_CHECKING:
    from transformer_comparison.data.corpora import Corpus


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
        write_text_atomic(path, self.to_json())

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
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a saved tokenizer (not UTF-8 text)") from None
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
