"""Mechanisms looked up by name: adding one is adding a file with `@register_attention("name")`."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from transformer_comparison.attention.base import AttentionKernel

_REGISTRY: dict[str, type[AttentionKernel]] = {}
KernelClass = TypeVar("KernelClass", bound=type[AttentionKernel])


def register_attention(name: str) -> Callable[[KernelClass], KernelClass]:
    def decorate(cls: KernelClass) -> KernelClass:
        if name in _REGISTRY:
            raise ValueError(f"attention mechanism {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def kernel_options(name: str) -> dict[str, Any]:
    """The construction options of a mechanism and their defaults, e.g. {'window': 128}."""
    cls = kernel_class(name)
    params = inspect.signature(cls.__init__).parameters
    return {key: p.default for key, p in params.items() if key != "self" and p.kind is p.KEYWORD_ONLY}


def kernel_class(name: str) -> type[AttentionKernel]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention mechanism {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_attention(name: str, **options: Any) -> AttentionKernel:
    """Construct a mechanism by name with its options fixed, e.g. build_attention("local", window=128)."""
    valid = kernel_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        allowed = ", ".join(valid) or "none"
        raise ValueError(f"{name} attention has no option {', '.join(unknown)}; valid options: {allowed}")
    return _REGISTRY[name](**options)
