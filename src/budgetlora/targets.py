"""Target-module patterns: check that every entry matches something, and translate globs into what peft matches.

peft matches a list entry against module names by suffix only (`name == entry` or `name.endswith("." + entry)`), so
an entry such as `roberta.encoder.layer.*.output.dense` silently matches nothing. Here every entry must match at
least one module, and the error lists the closest real names.

Presets read the same on every encoder family, whatever its module names (`query`/`q_lin`/`Wqkv`/`attn.q`, ...):
`all-linear` is every linear layer of the encoder (never the head or a pooler), `attention` those inside an
attention block, `ffn` the other linear layers of the transformer blocks.

A string that is not a preset is one regular expression over whole module names, as peft reads a string. Where it
looks like a module name or glob (`lora.target_modules=query`, brackets forgotten), the error, or the warning when it
matches other modules than the list `[query]` would, says so and gives the list to write.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass

from .config import ConfigError, LoraSettings

log = logging.getLogger(__name__)
GLOB_CHARS = "*?["
PRESETS = ("all-linear", "attention", "ffn")
ATTENTION_PART = re.compile(r"attn|attention", re.IGNORECASE)
IN_BLOCK = re.compile(r"\.\d+\.")  # a numbered block (layer.3., layers.3., albert_layers.0., ...)
# How peft finds a module's layer index for layers_to_transform (its default layers_pattern names).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")
# A string target of only name characters, dots and glob wildcards was likely meant as a one-entry list.
NAME_LIKE = re.compile(r"[\w.*?-]+")


@dataclass
class TargetMatch:
    """What the target patterns resolve to: the value handed to peft, and the modules each pattern matched."""

    peft_target_modules: list[str] | str
    matches: dict[str, list[str]]

    def summary(self) -> str:
        return "\n".join(f"  {pattern!r}: {len(names)} modules ({', '.join(module_kinds(names))})"
                         for pattern, names in self.matches.items())


def module_kinds(names: list[str]) -> list[str]:
    """Matched names with block numbers as `*`, once each: what a pattern chose, in the family's own names."""
    return list(dict.fromkeys(IN_BLOCK.sub(".*.", name) for name in names))


def preset_modules(preset: str, linear_names: list[str]) -> list[str]:
    """The encoder's linear layers that a preset names (linear_names: the encoder's, pooler excluded)."""
    attention = [name for name in linear_names if any(ATTENTION_PART.search(part) for part in name.split("."))]
    if preset == "all-linear":
        return list(linear_names)
    if preset == "attention":
        return attention
    return [name for name in linear_names if IN_BLOCK.search(name) and name not in attention]


def glob_to_regex(pattern: str) -> str:
    """Translate a dotted-name glob into a regex matching a suffix of full module names.

    `*` matches within one name part, `**` across parts, `?` one character; an entry without dots therefore matches
    the last name part exactly, the same thing peft's suffix rule does for plain names.
    """
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^.]*", "?": "[^.]"}.get(char, re.escape(char)))
        i += 1
    return r"(?:.*\.)?" + "".join(out)


def _peft_suffix_match(entry: str, name: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _entry_matcher(entry: str, syntax: str):
    if syntax == "peft":
        return lambda name: _peft_suffix_match(entry, name)
    regex = re.compile(glob_to_regex(entry))
    return lambda name: regex.fullmatch(name) is not None


def _closest(entry: str, names: list[str], count: int = 5) -> list[str]:
    # Compare against every dotted suffix, so "query_proj" suggests "query" and a wrong full path its real form.
    suffixes = {".".join(name.split(".")[i:]) for name in names for i in range(len(name.split(".")))}
    return difflib.get_close_matches(entry, sorted(suffixes), n=count, cutoff=0.4)


def resolve_targets(lora: LoraSettings, module_names: list[str], linear_names: list[str] | None = None) -> TargetMatch:
    """Match `lora.target_modules` against the model's targetable module names; raise if any entry matches none.

    linear_names: the encoder's linear layers, for the presets (default: module_names).
    """
    targets = lora.target_modules
    if isinstance(targets, str) and targets not in PRESETS:  # a full regular expression, as peft treats a string
        if lora.layers_to_transform is not None:
            raise ConfigError("lora.target_modules: a regular expression cannot be combined with "
                              "lora.layers_to_transform (peft refuses it); use a list of patterns")
        try:
            regex = re.compile(targets)
        except re.error as error:
            raise ConfigError(f"lora.target_modules: invalid regular expression {targets!r}: {error}. "
                              f"{_string_hint(targets)}") from None
        matched = [name for name in module_names if regex.fullmatch(name)]
        if not matched:
            raise ConfigError(f"lora.target_modules: the regular expression {targets!r} matches no module (it must "
                              f"match a whole module name, e.g. {module_names[0]!r}). {_string_hint(targets)}")
        if NAME_LIKE.fullmatch(targets):  # maybe meant as a list entry: say so where the two readings differ
            as_list = [name for name in module_names if _entry_matcher(targets, lora.pattern_syntax)(name)]
            if as_list and as_list != matched:  # "encoder.layer.1.*.dense" as a regex also takes layers 10 and 11
                log.warning("lora.target_modules %r matches %d modules as a regular expression, %d as a list "
                            "entry. %s", targets, len(matched), len(as_list), _string_hint(targets))
        return TargetMatch(targets, {targets: matched})

    matches = {}
    for entry in [targets] if isinstance(targets, str) else targets:
        if entry in PRESETS:
            matched = preset_modules(entry, module_names if linear_names is None else linear_names)
        else:
            matched = [name for name in module_names if _entry_matcher(entry, lora.pattern_syntax)(name)]
        if not matched:
            raise ConfigError(_no_match_message(entry, lora.pattern_syntax, module_names))
        if lora.layers_to_transform is not None:
            matched = [name for name in matched if in_layers(name, lora.layers_to_transform)]
            if not matched:
                raise ConfigError(f"lora.target_modules: entry {entry!r} matches no module in "
                                  f"lora.layers_to_transform={lora.layers_to_transform}")
        matches[entry] = matched
    if lora.pattern_syntax == "peft" and not any(entry in PRESETS for entry in matches):
        return TargetMatch(list(targets), matches)
    # peft gets the exact module names the globs matched, layers already chosen: what is counted is what is adapted,
    # by construction (peft's own layer filter is not applied to exact names).
    return TargetMatch(sorted({name for names in matches.values() for name in names}), matches)


def _string_hint(targets: str) -> str:
    """What a string target means, and the list to write where it looks like a module name or glob."""
    hint = "A plain string is read as one regular expression over whole module names, as peft reads it"
    if NAME_LIKE.fullmatch(targets):
        # YAML reads a leading "*" as an alias: such an entry must be quoted, and the list with it.
        as_list = f"'[\"{targets}\"]'" if targets.startswith("*") else f"[{targets}]"
        hint += f"; to use it as a name pattern, give a list: lora.target_modules={as_list}"
    return hint


def in_layers(name: str, layers: list[int]) -> bool:
    found = LAYER_INDEX.search(name)
    return found is not None and int(found.group(1)) in layers


def _no_match_message(entry: str, syntax: str, module_names: list[str]) -> str:
    message = f"lora.target_modules: entry {entry!r} matches no module of this model"
    closest = _closest(entry, module_names)
    if closest:
        message += f"; closest module names: {', '.join(closest)}"
    else:  # another family's name (query on DistilBERT's q_lin): this family's own, and the presets
        kinds = sorted({name.rsplit(".", 1)[-1] for name in module_names})
        message += (f"; this model's layers are named {', '.join(kinds[:12])}{', ...' if len(kinds) > 12 else ''}; "
                    f"or use a preset, the same on every family: {', '.join(PRESETS)}")
    if syntax == "peft" and any(char in entry for char in GLOB_CHARS):
        as_glob = [name for name in module_names if _entry_matcher(entry, "glob")(name)]
        message += (". With pattern_syntax 'peft' (literal name suffixes, what peft does with a list) '*' is not a "
                    "wildcard, so peft would have skipped this entry silently")
        if as_glob:
            message += f"; read as a glob (pattern_syntax: glob) it matches {len(as_glob)} modules"
    return message
