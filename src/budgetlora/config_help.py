"""`budgetlora config`: every config key with its type, default and help, the help read from config.py's comments.

The help of a key is written once, as the comment lines right above its field in config.py (or augment.py for
augment.noise, search_space.py for an entry of sweep.space); this module reads them from the source (inspect, tokenize,
ast) instead of repeating them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass

from .config import RunConfig
from .search_space import ParamSpec, as_yaml


@dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, as an override names it: model.max_length
    type: str  # the annotation as config.py writes it
    default: str  # as YAML, the way an override writes the value
    help: str  # the comment lines right above the field, joined


@dataclass(frozen=True)
class Section:
    prefix: str  # "" for the top level, else e.g. "augment.noise"
    doc: str  # the section class's docstring
    keys: list[ConfigKey]


def field_sources(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation as written, the full-line comments right above it, joined)} of dataclass `cls`."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT and token.line.lstrip().startswith("#")}  # not a trailing comment
    (class_node,) = ast.parse(source).body
    assert isinstance(class_node, ast.ClassDef)
    found = {}
    for node in class_node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments:
                above.insert(0, comments[line])
                line -= 1
            found[node.target.id] = (ast.unparse(node.annotation), " ".join(above))
    return found


def config_sections(cls: type = RunConfig, prefix: str = "") -> list[Section]:
    """`cls`'s keys with their type, default and help, then each nested section's, depth first in field order."""
    hints = typing.get_type_hints(cls)
    sources = field_sources(cls)
    keys, nested = [], []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            nested += config_sections(hints[field.name], f"{key}.")
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        annotation, help_text = sources[field.name]
        keys.append(ConfigKey(key, annotation, as_yaml(default), help_text))
    return [Section(prefix.rstrip("."), inspect.cleandoc(cls.__doc__ or ""), keys), *nested]


def format_config_help(width: int = 100) -> str:
    """Every key, section by section: `key: type = default`, then its help indented; then the fields of an entry of
    sweep.space (one per dotted key it searches)."""
    lines = []
    for section in [*config_sections(), *config_sections(ParamSpec, "sweep.space.<key>.")]:
        title = f"{section.prefix}: " if section.prefix else "top level: "
        lines += ["", *textwrap.wrap(title + " ".join(section.doc.split()), width)]
        for key in section.keys:
            lines.append(f"  {key.key}: {key.type} = {key.default}")
            lines += textwrap.wrap(key.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines.append("\nSet them in the YAML config's sections or on the command line: budgetlora train --config C "
                 "lora.r=4 model.head=mean")
    return "\n".join(lines).lstrip("\n")
