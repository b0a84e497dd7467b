"""Positional encodings looked up by name: adding one is adding a file with `@register_position("name")`
(entry-point group `transformer_comparison.position` for other packages), as for attention mechanisms."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from transformer_comparison.position.base import PositionEncoding
from transformer_comparison.registry import Registry

ENCODINGS: Registry[PositionEncoding] = Registry(
    "position embedding", "transformer_comparison.position", "transformer_comparison.position"
)
EncodingClass = TypeVar("EncodingClass", bound=type[PositionEncoding])


def register_position(name: str) -> Callable[[EncodingClass], EncodingClass]:
    """Class decorator registering a `PositionEncoding` subclass as `name`."""
    return ENCODINGS.register(name)  # type: ignore[return-value]


def registered_names() -> tuple[str, ...]:
    return ENCODINGS.names()


def position_class(name: str) -> type[PositionEncoding]:
    return ENCODINGS.get(name)


def options_model(name: str) -> type:
    return ENCODINGS.options_model(name)


def build_position(name: str, **options: Any) -> PositionEncoding:
    """An encoding with its options fixed, e.g. build_position("rope", base=10000.0)."""
    return ENCODINGS.build(name, **options)
