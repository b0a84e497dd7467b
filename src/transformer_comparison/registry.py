"""A registry of named classes discovered from a package and an entry-point group.

Both axes of the comparison use one: attention mechanisms (`attention/registry.py`) and positional
encodings (`position/registry.py`). Adding an entry is adding a module to the package that decorates
its class with `@registry.register("name")`; every module of the package is imported on first
lookup, and other installed packages add entries through the entry-point group.

An entry's construction options are the keyword-only parameters of its `__init__` with their type
hints (bounds as `Annotated[int, Field(ge=1)]`) and defaults; `options_model(name)` makes them a
pydantic model, which the config schema, the CLI and `build` all validate against.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Named classes of one kind (`kind` is used in messages: "attention mechanism")."""

    def __init__(self, kind: str, package: str, entry_point_group: str) -> None:
        self.kind, self.package, self.entry_point_group = kind, package, entry_point_group
        self._classes: dict[str, type[Entry]] = {}
        self._option_models: dict[str, type[BaseModel]] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[type[Entry]], type[Entry]]:
        """Class decorator: make the class available as `name` (a Python identifier: it names a config section)."""
        if not name.isidentifier():
            raise ValueError(f"{self.kind} name {name!r} must be a Python identifier (it becomes a config section)")

        def decorate(cls: type[Entry]) -> type[Entry]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return decorate

    def discover(self) -> None:
        """Import every public module of the package and every entry point of the group, once."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")
        for entry in entry_points(group=self.entry_point_group):
            entry.load()

    def names(self) -> tuple[str, ...]:
        """Every entry, by the classes' `display_order` (default 100), then name."""
        self.discover()
        return tuple(sorted(self._classes, key=lambda n: (getattr(self._classes[n], "display_order", 100), n)))

    def get(self, name: str) -> type[Entry]:
        self.discover()
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._classes)}")
        return self._classes[name]

    def option_parameters(self, name: str) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.get(name).__init__).parameters  # type: ignore[misc]
        return {key: p for key, p in params.items() if p.kind is p.KEYWORD_ONLY}

    def defaults(self, name: str) -> dict[str, Any]:
        return {key: p.default for key, p in self.option_parameters(name).items()}

    def options_model(self, name: str) -> type[BaseModel]:
        if name not in self._option_models:
            cls = self.get(name)
            hints = typing.get_type_hints(cls.__init__, include_extras=True)  # type: ignore[misc]
            fields = {key: (hints.get(key, Any), p.default) for key, p in self.option_parameters(name).items()}
            config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)
            model = create_model(f"{cls.__name__}Options", __config__=config, **fields)  # type: ignore[call-overload]
            model.__doc__ = f"Options of the {name} {self.kind} ({cls.__name__})."
            self._option_models[name] = model
        return self._option_models[name]

    def build(self, name: str, **options: Any) -> Entry:
        """An instance with validated options: an unknown option, a wrong type or a value out of
        bounds is a one-line ValueError naming it and what is valid."""
        model = self.options_model(name)
        unknown = sorted(set(options) - set(model.model_fields))
        if unknown:
            allowed = ", ".join(model.model_fields) or "none"
            raise ValueError(f"{name} {self.kind} has no option {', '.join(unknown)}; valid options: {allowed}")
        try:
            checked = model.model_validate(options)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            key = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{name} {self.kind}: {key}={first.get('input')!r} {first['msg'].lower()}") from None
        return self._classes[name](**{key: getattr(checked, key) for key in model.model_fields})
