"""`tcompare list`: what the registries hold, the mechanisms and the encodings, with each option's type
and default, so a user can see what `attention.<mechanism>.<option>=...` accepts without reading code."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic import BaseModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("mechanisms", "encodings", "all"), default="all",
                        help="what to list (default: %(default)s)")


def describe_options(model: type[BaseModel]) -> list[str]:
    """'window: int >= 1 = 32' for each field of an options model."""
    lines = []
    for name, field in model.model_fields.items():
        bounds = " ".join(f"{symbol} {getattr(meta, attr)}" for meta in field.metadata
                          for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                          if getattr(meta, attr, None) is not None)
        lines.append(f"{name}: {_type_name(field.annotation)}{' ' + bounds if bounds else ''} = {_as_typed(field.default)}")
    return lines


def _as_typed(value: Any) -> str:
    """A default as it is written in a config or an override: null, true, false, 0.5, linear."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(arg) for arg in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:
        return " | ".join(_type_name(arg) for arg in args)
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""


def run(args: argparse.Namespace) -> int:
    from transformer_comparison.attention.registry import kernel_class, options_model, registered_names
    from transformer_comparison.position.registry import options_model as position_options
    from transformer_comparison.position.registry import position_class
    from transformer_comparison.position.registry import registered_names as position_names

    if args.what in ("mechanisms", "all"):
        print("attention mechanisms (attention.type; options: attention.<name>.<option>)")
        for name in registered_names():
            cls = kernel_class(name)
            notes = [] if cls.has_entropy else ["no attention entropy"]
            notes += [f"refuses {p}" for p in cls.refused_positions]
            print(f"  {name}: {first_line(cls.__doc__)}{' (' + '; '.join(notes) + ')' if notes else ''}")
            for line in describe_options(options_model(name)):
                print(f"      {line}")
    if args.what in ("encodings", "all"):
        print("positional encodings (position.type; options: position.<name>.<option>)")
        for name in position_names():
            print(f"  {name}: {first_line(position_class(name).__doc__)}")
            for line in describe_options(position_options(name)):
                print(f"      {line}")
    return 0
