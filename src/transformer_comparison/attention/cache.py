"""What an attention kernel keeps between decoding calls, one object per layer (docs/decoding.md).

    cache = kernel.new_cache()                       # empty; holds nothing yet
    out = kernel.decode(q, k, v, cache, alibi_slopes=..., rope=...)   # n new tokens: prefill, then 1 at a time
    cache.position, cache.nbytes                     # tokens seen so far; bytes it holds

`DecodeCache` is the interface the model relies on; each mechanism decides what it stores:
`KVCache` (below) for every softmax mechanism, keeping keys (rotated at their absolute positions
when RoPE is on, see `AttentionKernel.decode`) and values and the absolute position of its first
key (optionally only the last `max_keys`, for local attention), and a constant-size recurrent state
for linear attention (`attention/linear.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

MIN_CAPACITY = 16  # keys allocated at least, so that the first one-token steps do not reallocate


class DecodeCache(ABC):
    """One layer's decoding memory. Positions are absolute: the first token ever appended is position 0."""

    @property
    @abstractmethod
    def position(self) -> int:
        """Tokens seen so far: the absolute position of the next token."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The tensors whose contents the cache needs (views of what it holds, not spare capacity)."""

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: the sum of `tensors()`' sizes."""
        return sum(t.nbytes for t in self.tensors())

    @property
    def allocated_bytes(self) -> int:
        """Bytes allocated, spare capacity included (>= nbytes)."""
        return self.nbytes


class KVCache(DecodeCache):
    """Keys and values (batch, kv_heads, n, head_dim) of the tokens seen, oldest first, as the kernel
    reads them (the caller decides: the default decode stores RoPE-rotated keys).

    `first_position` is the absolute position of `k[:, :, 0]`; it moves forward when old keys are
    dropped, so `position` stays absolute. `max_keys`: keep at most this many keys between
    calls (`evict()` drops the oldest; None keeps them all). Storage is a buffer with spare capacity
    (doubling when unbounded, `max_keys` spare slots when bounded), so an append is amortised
    O(new tokens) and the held keys are a view, never concatenated afresh each step.
    """

    def __init__(self, max_keys: int | None = None) -> None:
        if max_keys is not None and (isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 0):
            raise ValueError(f"KVCache: max_keys must be None or an integer >= 0, got {max_keys!r}")
        self.max_keys = max_keys
        self.first_position = 0
        self.length = 0  # keys held
        self._start = 0  # index of the first held key in the buffers
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    @property
    def position(self) -> int:
        return self.first_position + self.length

    @property
    def k(self) -> Tensor:
        if self._k is None:
            raise ValueError("the cache is empty: append keys before reading them")
        return self._k[:, :, self._start : self._start + self.length]

    @property
    def v(self) -> Tensor:
        if self._v is None:
            raise ValueError("the cache is empty: append values before reading them")
        return self._v[:, :, self._start : self._start + self.length]

    def tensors(self) -> list[Tensor]:
        return [] if self._k is None else [self.k, self.v]

    @property
    def allocated_bytes(self) -> int:
        return 0 if self._k is None or self._v is None else self._k.nbytes + self._v.nbytes

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add the keys and values (batch, kv_heads, n, head_dim) of n new tokens after the held ones."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"KVCache.append expects k and v of one shape (batch, kv_heads, n, head_dim), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if self._k is not None and (k.shape[:2] != self._k.shape[:2] or k.shape[3] != self._k.shape[3]
                                    or k.dtype != self._k.dtype or k.device != self._k.device):
            raise ValueError(f"KVCache.append: new keys {tuple(k.shape)} {k.dtype} do not match the cached "
                             f"{tuple(self._k.shape[:2])} x head_dim {self._k.shape[3]} {self._k.dtype}")
        n = k.shape[2]
        needed = self.length + n
        if self._k is None or self._start + needed > self._k.shape[2]:
            self._reallocate(k, needed)
        assert self._k is not None and self._v is not None
        end = self._start + self.length
        self._k[:, :, end : end + n] = k
        self._v[:, :, end : end + n] = v
        self.length = needed

    def evict(self) -> None:
        """Drop the oldest keys beyond `max_keys`; `first_position` moves forward by as many."""
        if self.max_keys is not None and self.length > self.max_keys:
            drop = self.length - self.max_keys
            self._start += drop
            self.length -= drop
            self.first_position += drop

    def _reallocate(self, like: Tensor, needed: int) -> None:
        """New buffers with room for `needed` keys plus spare capacity; the held keys move to the front."""
        spare = needed if self.max_keys is None else max(self.max_keys, 1)
        capacity = max(needed + spare, MIN_CAPACITY)
        batch, kv_heads, _, head_dim = like.shape
        new_k = like.new_empty(batch, kv_heads, capacity, head_dim)
        new_v = like.new_empty(batch, kv_heads, capacity, head_dim)
        if self.length:
            new_k[:, :, : self.length] = self.k
            new_v[:, :, : self.length] = self.v
        self._k, self._v, self._start = new_k, new_v, 0

    def __repr__(self) -> str:
        shape = None if self._k is None else (*self._k.shape[:2], self.length, self._k.shape[3])
        return f"KVCache(shape={shape}, first_position={self.first_position}, max_keys={self.max_keys})"


def caches_nbytes(caches: list[DecodeCache]) -> int:
    """Bytes held by a model's caches (one per layer)."""
    return sum(cache.nbytes for cache in caches)


