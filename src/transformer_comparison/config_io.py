"""Reading config YAML and `section.key=value` overrides into the raw dict `config.Config` validates,
and pydantic's errors as one line each. The schema itself lives in config.py; these functions take
the section models as an argument.

- YAML: PyYAML's SafeLoader (no Python tags), reading `1e-3` as a float as YAML 1.2 does; a key given
  twice in one mapping is an error; a document whose aliases expand to more than MAX_NODES values
  (a "billion laughs" bomb) is refused before anything expands it.
- Keys: `section.key`, and `section.entry.key` for the per-mechanism / per-encoding subsections of
  `attention` and `position` (`attention.local.window=64`). The flat form of the options that
  existed before those subsections (`attention.window=16`) sets that option on every entry that has
  it; renamed keys (`attention.gqa_kv_heads` -> `attention.gqa.kv_heads`) are mapped.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from transformer_comparison.errors import UserError

MAX_NODES = 100_000  # values a config may expand to; real configs have about a hundred
Sections = Mapping[str, type[BaseModel]]


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 (no dot) as a float and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Values the node tree expands to, counting an alias each time it is used; stops past `limit`."""
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
    return count


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`; UserError naming `source` for invalid YAML, duplicates or bombs."""
    try:
        loader = _YamlLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, MAX_NODES) > MAX_NODES:
                raise UserError(f"{source} expands to more than {MAX_NODES:,} values (YAML aliases nested too deep); "
                                "refusing to read it")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise UserError(f"{source} is not valid YAML: {detail}") from None


def read_yaml(path: Path, sections: Sections, legacy: Mapping[tuple[str, str], tuple[str, str]]) -> dict[str, Any]:
    """A config file as a raw dict, its flat legacy keys moved into their subsections."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of sections ({', '.join(sections)}), got {type(data).__name__}")
    for name, section in data.items():
        if isinstance(section, dict) and name in sections:
            for key in [k for k in section if isinstance(k, str) and k not in sections[name].model_fields]:
                value = section.pop(key)
                _route_flat_key(data, sections, legacy, name, key, lambda field: value, f"config file {path}")
    return data


def apply_override(raw: dict[str, Any], override: str, sections: Sections,
                   legacy: Mapping[tuple[str, str], tuple[str, str]]) -> None:
    """Set `section.key=value` or `section.entry.key=value` in the raw dict; the value is a YAML scalar."""
    dotted, sep, text = override.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"override {override!r} should look like section.key=value, e.g. training.learning_rate=3e-4")
    section_name, key = parts[0], parts[1]
    section = sections.get(section_name)
    if section is None:
        raise UserError(f"unknown config section {section_name!r} in override {override!r}; valid sections: {', '.join(sections)}")
    target = raw.setdefault(section_name, {})
    if not isinstance(target, dict):
        raise UserError(f"{section_name} should be a mapping of keys, got {target!r}")
    text = text.strip()
    if len(parts) == 3:
        sub = _submodel(section, key)
        if sub is None:
            raise UserError(f"{section_name}.{key} has no keys to set in override {override!r}; "
                            f"sections with options: {', '.join(_subsections(section)) or 'none'}")
        if parts[2] not in sub.model_fields:
            valid = ", ".join(sub.model_fields) or "none"
            raise UserError(f"unknown key {dotted.strip()} in override {override!r}; valid keys of {section_name}.{key}: {valid}")
        entry = target.setdefault(key, {})
        if not isinstance(entry, dict):
            raise UserError(f"{section_name}.{key} should be a mapping of keys, got {entry!r}")
        entry[parts[2]] = _value(sub.model_fields[parts[2]].annotation, text, override)
        return
    if key in section.model_fields and _submodel(section, key) is None:
        target[key] = _value(section.model_fields[key].annotation, text, override)
        return
    _route_flat_key(raw, sections, legacy, section_name, key, lambda field: _value(field, text, override),
                    f"override {override!r}")


def _route_flat_key(raw: dict[str, Any], sections: Sections, legacy: Mapping[tuple[str, str], tuple[str, str]],
                    section_name: str, key: str, value_for: Any, source: str) -> None:
    """Put a flat option key of `section_name` into the subsection(s) that own it, or raise."""
    section = sections[section_name]
    if (section_name, key) in legacy:
        owners = [legacy[(section_name, key)]]
    else:
        owners = [(entry, key) for entry in _subsections(section) if key in _submodel(section, entry).model_fields]
    if not owners:
        plain = ", ".join(k for k in section.model_fields if _submodel(section, k) is None)
        owners_of: dict[str, list[str]] = {}
        for entry in _subsections(section):
            for option in _submodel(section, entry).model_fields:
                owners_of.setdefault(option, []).append(entry)
        if not owners_of:
            raise UserError(f"unknown key {section_name}.{key} in {source}; valid keys of {section_name}: {plain}")
        options = ", ".join(f"{option} ({', '.join(entries)})" for option, entries in sorted(owners_of.items()))
        raise UserError(f"unknown key {section_name}.{key} in {source}; valid keys of {section_name}: {plain}, "
                        f"or an option of one of its entries: {options}")
    target = raw.setdefault(section_name, {})
    for entry, option in owners:
        if entry not in section.model_fields:
            continue  # a legacy key of an entry that is not registered here
        sub = _submodel(section, entry)
        target.setdefault(entry, {})[option] = value_for(sub.model_fields[option].annotation)


def _submodel(section: type[BaseModel], key: str) -> type[BaseModel] | None:
    field = section.model_fields.get(key)
    annotation = field.annotation if field else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _subsections(section: type[BaseModel]) -> list[str]:
    return [key for key in section.model_fields if _submodel(section, key) is not None]


def _value(annotation: Any, text: str, override: str) -> Any:
    value = parse_yaml(text, f"override {override!r}")
    # A string-valued key keeps what was typed (logging.project=123, data.dataset=on).
    if value is not None and not isinstance(value, str) and _accepts_str(annotation):
        return text
    return value


def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    return bool(args) and any(arg is str or isinstance(arg, str) or _accepts_str(arg) for arg in args)


# ---------------------------------------------------------------------------------------------
# Errors


def user_error(error: ValidationError, sections: Sections) -> UserError:
    """A pydantic ValidationError as one line (the first problem, and how many more)."""
    errors = error.errors(include_url=False)
    message = _describe(errors[0], sections)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return UserError(message)


def _model_at(loc: list[str], sections: Sections) -> type[BaseModel] | None:
    """The section model that holds the key at loc[-1]."""
    model: type[BaseModel] | None = sections.get(loc[0])
    for part in loc[1:-1]:
        model = _submodel(model, part) if model is not None else None
    return model


def _describe(error: dict[str, Any], sections: Sections) -> str:
    """One pydantic error as one line: key path, bad value, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    path = ".".join(loc)
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown config section {loc[0]!r}; valid sections: {', '.join(sections)}"
        holder = _model_at(loc, sections)
        valid = ", ".join(holder.model_fields) if holder is not None and holder.model_fields else "none"
        return f"unknown key {path}; valid keys of {'.'.join(loc[:-1])}: {valid}"
    if kind == "model_type":
        holder = sections.get(loc[0]) if len(loc) == 1 else _submodel(_model_at(loc + ["x"], sections) or BaseModel, loc[-1])
        keys = ", ".join(holder.model_fields) if holder is not None else ""
        return f"{path} should be a mapping of keys ({keys}), got {_short(value)}"
    msg = msg.removeprefix("Value error, ")
    if not path:  # a cross-field rule: the message names its keys
        return msg
    if msg.startswith("Input should be "):
        msg = "should be " + msg.removeprefix("Input should be ")
    elif not msg.startswith("should "):
        msg = f"is invalid: {msg}"
    return f"{path}={_short(value)} {msg}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
