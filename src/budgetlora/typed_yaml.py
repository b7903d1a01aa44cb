"""Typed dataclasses from YAML: values checked against the fields' annotations, errors that name the dotted key,
`section.key=value` overrides, and YAML files read with their duplicate keys refused. Knows no schema: config.py owns
that (the run config's sections and their validation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# A value as errors show it, cut short: a few hundred bytes of YAML aliases (`&a [x, x], &b [*a, *a], ...`) make a
# value whose full repr takes gigabytes.
_short_repr = reprlib.Repr()  # 6 items a list, 3 levels deep; strings (paths, patterns) whole up to 120 characters
_short_repr.maxstring = _short_repr.maxother = 120
_short_repr.maxlevel = 3
shown = _short_repr.repr  # every config error that quotes a value goes through it


# --- building dataclasses from plain dicts, with type checks that name the key -------------------------------------

def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` if it fits `annotation` (ints and numeric strings are accepted for floats), else raise."""
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):  # a section inside a mapping (sweep.space.<key>)
        return from_dict(annotation, value, f"{key}.")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ConfigError as error:
                if str(error).startswith(f"{key}."):  # a mapping of this option, wrong in one entry: that one's error
                    raise
                continue
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {shown(value)}")
    if annotation is type(None):
        require(value is None, key, f"expected null, got {shown(value)}")
        return value
    if origin is Literal:
        require(value in typing.get_args(annotation), key,
                 f"must be one of {list(typing.get_args(annotation))}, got {shown(value)}")
        return value
    if origin is list:
        require(isinstance(value, list), key, f"expected a list, got {shown(value)}")
        (item_type,) = typing.get_args(annotation)
        return [_check_type(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), key, f"expected a mapping, got {shown(value)}")
        key_type, value_type = typing.get_args(annotation)
        return {_check_type(k, key_type, key): _check_type(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; a number is what was meant
            with contextlib.suppress(ValueError):
                return float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, key, f"expected a number, got {shown(value)}")
        return float(value)
    if annotation in (int, str, bool):
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        misread = annotation is str and isinstance(value, (int, float, bool, datetime.date))  # YAML's own types
        hint = " (YAML read it as a number, boolean or date: write it in quotes)" if misread else ""
        require(ok, key, f"expected {annotation.__name__}, got {shown(value)}{hint}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module, not in the config


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # slow (it evaluates the annotations' text), and asked for at every load


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `values`; unknown keys and wrong types raise ConfigError naming the dotted key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown(values)}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, annotation, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a dataclass from another module (augment.NoiseSettings) validates itself
        raise ConfigError(str(error).replace(f"{cls.__name__}.", prefix, 1)) from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected dotted.key=value")
        *parents, leaf = key.split(".")
        if key.startswith("sweep.space."):  # the space's entries are named by dotted keys themselves
            parents, leaf = ["sweep", "space"], key.removeprefix("sweep.space.")
        node = values
        for part in parents:
            if node.get(part) is None:  # absent, or an empty section (`model:` in YAML) or space (null: the default)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({str(error).splitlines()[0]}); "
                              f"quote patterns that start with '*', e.g. {key}='[\"*.dense\"]'") from None
    return values


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "", seen: set[int] | None = None) -> None:
    """Raise ConfigError for a key given twice in one mapping (PyYAML would silently keep the last)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already checked (or to itself, in a recursive document)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix.rstrip('.')}[{i}].", seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            # A merge key (<<) may be overridden by the mapping's own keys: that is what it is for.
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in first_line:
                    raise ConfigError(f"{path}, line {line}: {prefix}{key.value}: given twice (first at line "
                                      f"{first_line[key.value]}); YAML would silently keep the last, so remove one")
                first_line[key.value] = line
            _refuse_duplicate_keys(value, path, f"{prefix}{key.value}.", seen)


def load_yaml_text(text: str, path: Path) -> Any:
    """The YAML document `text` (of the file `path`), as yaml.safe_load reads it, after refusing duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()
