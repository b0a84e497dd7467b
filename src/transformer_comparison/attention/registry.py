"""Mechanisms looked up by name: adding one is adding a file with `@register_attention("name")`.

Every module of this package is imported on first lookup, so a new file registers itself without
being listed anywhere; mechanisms from other installed packages join through the entry-point group
`transformer_comparison.attention` (docs/architecture.md, "Adding a mechanism"):

    # the other package's pyproject.toml
    [project.entry-points."transformer_comparison.attention"]
    my_mechanism = "my_package.my_module"      # a module that calls @register_attention("my_mechanism")

Options are the keyword-only parameters of the kernel's `__init__` (see `transformer_comparison.registry`).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from transformer_comparison.attention.base import AttentionKernel
from transformer_comparison.registry import Registry

ENTRY_POINT_GROUP = "transformer_comparison.attention"
MECHANISMS: Registry[AttentionKernel] = Registry("attention", "transformer_comparison.attention", ENTRY_POINT_GROUP)
KernelClass = TypeVar("KernelClass", bound=type[AttentionKernel])


def register_attention(name: str) -> Callable[[KernelClass], KernelClass]:
    """Class decorator registering an `AttentionKernel` subclass as `name`."""
    return MECHANISMS.register(name)  # type: ignore[return-value]


def discover() -> None:
    MECHANISMS.discover()


def registered_names() -> tuple[str, ...]:
    """Every registered mechanism, in registration order."""
    return MECHANISMS.names()


def baseline_name() -> str:
    """The mechanism others are compared against (the one whose class sets `is_baseline`)."""
    names = [name for name in registered_names() if kernel_class(name).is_baseline]
    return names[0] if names else registered_names()[0]


def kernel_class(name: str) -> type[AttentionKernel]:
    return MECHANISMS.get(name)


def kernel_options(name: str) -> dict[str, Any]:
    """The construction options of a mechanism and their defaults, e.g. {'window': 32}."""
    return MECHANISMS.defaults(name)


def options_model(name: str) -> type:
    """The pydantic model of a mechanism's options (types, bounds, defaults from its __init__)."""
    return MECHANISMS.options_model(name)


def build_attention(name: str, **options: Any) -> AttentionKernel:
    """Construct a mechanism by name with its options fixed, e.g. build_attention("local", window=128)."""
    return MECHANISMS.build(name, **options)
