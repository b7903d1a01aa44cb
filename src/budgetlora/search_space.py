"""The search space of `budgetlora sweep`: config section `sweep.space`, one entry per dotted config key.

```yaml
sweep:
  space:
    lora.r: {choices: [2, 4, 8]}
    train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}
    train.head_learning_rate: {choices: [1, 10], times: train.learning_rate}   # 1x or 10x the trial's learning rate
    lora.bias: {choices: [none]}                                                # one choice: fixed in every trial
```

An entry is a list of `choices`, or a range `low`..`high` (`log: true` on a log scale, `step` a grid; ints when low,
high and step are ints, else floats). A single choice is a fixed value, set in every trial and not searched. `times`
makes the value relative: the value drawn times the named key's value in the trial (drawn, or the base config's).
Without `sweep.space` the sweep searches DEFAULT_SPACE. This module reads plain values only (the config's settings by
dotted key); config.py checks a space against the loader, sweep.py draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from .typed_yaml import shown

if TYPE_CHECKING:  # optuna is imported where a sweep runs: loading a config does not need it
    import optuna
    from optuna.distributions import BaseDistribution


def as_yaml(value: Any) -> str:
    """`value` as an override writes it: null, true, [query, value], roberta-base, 'on' (a string, quoted)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _fail(field: str, message: str) -> NoReturn:
    # A ValueError naming the field: the loader prefixes it with the entry's dotted key (config.from_dict).
    raise ValueError(f"ParamSpec.{field}: {message}")


def _label(choice: Any) -> Any:
    """What Optuna stores for a choice: the choice itself where its storages can, else its YAML text."""
    return choice if choice is None or isinstance(choice, (bool, int, float, str)) else as_yaml(choice)


# Choices are values or short lists (target modules). YAML aliases can make a 400-byte config a choice of 9**8
# values, which every check of it would walk (and each level multiplies the time by 9).
MAX_CHOICE_VALUES = 10_000


def _values_in(choice: Any, most: int) -> int:
    """How many values `choice` holds, its lists and mappings walked; the count stops past `most` before the items
    that pass it are queued (`&a [*a, *a, ...]` holds itself: each of its items would queue it all again)."""
    count, pending = 1, [choice]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            value = [*value.keys(), *value.values()]
        if isinstance(value, (list, tuple)):
            count += len(value)
            if count > most:
                break
            pending += value
    return count


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ParamSpec:
    """One entry of sweep.space, keyed by the dotted config key it sets: `choices`, or a range `low`..`high`."""

    # The values to choose from; a single one is fixed in every trial (not searched).
    choices: list[Any] | None = None
    # A range, both ends included: ints when low, high (and step) are ints, else floats.
    low: int | float | None = None
    high: int | float | None = None
    # Sample the range on a log scale (needs low > 0).
    log: bool = False
    # Sample the range on a grid of this step (not with log).
    step: int | float | None = None
    # Make the value relative: the value drawn times this key's value in the trial (drawn, or the base config's).
    times: str | None = None
    # Optuna's name for the parameter (default: the key), as the trials table and the study show it.
    name: str | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                _fail("choices", "give choices, or a range (low, high, log, step), not both")
            if not self.choices:
                _fail("choices", "must not be empty")
            if _values_in(self.choices, MAX_CHOICE_VALUES) > MAX_CHOICE_VALUES:
                _fail("choices", f"holds more than {MAX_CHOICE_VALUES:,} values (YAML aliases repeat theirs): "
                                 f"choices are values or short lists")
            labels = [_label(choice) for choice in self.choices]
            if len(set(labels)) < len(labels):
                _fail("choices", f"a value is given twice: {shown(self.choices)}")
            return
        if self.low is None or self.high is None:
            _fail("low", "give choices, or a range: both low and high")
        if self.low > self.high:
            _fail("low", f"empty range: low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            _fail("log", f"a log scale needs low > 0, got {self.low}")
        if self.step is not None and (self.step <= 0 or self.log):
            _fail("step", f"must be > 0 and cannot be combined with log, got {self.step}")

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def values(self) -> list[Any]:
        """The choices, or the range's ends: what the loader must accept (config.py checks each)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def distribution(self) -> BaseDistribution | None:
        """What Optuna draws this entry's value from (None: a fixed value, no Optuna parameter)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return None if self.fixed else CategoricalDistribution([_label(choice) for choice in self.choices])
        assert self.low is not None and self.high is not None
        if all(isinstance(end, int) for end in (self.low, self.high, self.step or 1)):
            return IntDistribution(self.low, self.high, step=self.step or 1, log=self.log)
        return FloatDistribution(self.low, self.high, step=self.step, log=self.log)

    def draw(self, trial: optuna.Trial, key: str) -> Any:
        """The value of `key` in `trial` (before `times`)."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        name, drawn = self.name or key, self.distribution()
        if drawn is None:
            return self.values()[0]
        if isinstance(drawn, CategoricalDistribution):
            return self.values()[drawn.choices.index(trial.suggest_categorical(name, drawn.choices))]
        if isinstance(drawn, IntDistribution):
            return trial.suggest_int(name, drawn.low, drawn.high, step=drawn.step, log=drawn.log)
        return trial.suggest_float(name, drawn.low, drawn.high, step=drawn.step, log=drawn.log)

    def describe(self) -> str:
        if self.choices is not None:
            text = ", ".join(as_yaml(choice) for choice in self.choices)
        else:
            text = f"{self.low:g} .. {self.high:g}" + (" (log)" if self.log else "") + \
                   (f" step {self.step:g}" if self.step is not None else "")
        return f"{text} x {self.times}" if self.times else text


# Earlier versions searched this space, fixed in code; the Optuna names are theirs, so their studies resume. The
# fixed entries give every trial the planner's description of a shape (planner.candidate_overrides: alpha 4r, no bias,
# every layer, no per-module patterns), and no LoRA+ (it sets the head's learning rate itself).
DEFAULT_SPACE: dict[str, ParamSpec] = {
    "lora.r": ParamSpec(choices=[1, 2, 4, 8, 16], name="r"),
    "lora.target_modules": ParamSpec(choices=["all-linear", "attention", "ffn"], name="targets"),  # targets.PRESETS
    "model.head": ParamSpec(choices=["standard", "mean"], name="head"),
    "train.learning_rate": ParamSpec(low=3e-4, high=5e-3, log=True, name="learning_rate"),
    "train.head_learning_rate": ParamSpec(choices=[1, 3, 10], times="train.learning_rate", name="head_lr_x"),
    "train.scheduler": ParamSpec(choices=["linear", "cosine"], name="scheduler"),
    "train.warmup_steps": ParamSpec(low=0.0, high=0.1, name="warmup_fraction"),  # below 1: a fraction of the steps
    "train.label_smoothing": ParamSpec(choices=[0.0, 0.1], name="label_smoothing"),
    "lora.alpha": ParamSpec(choices=[4], times="lora.r"),
    "lora.bias": ParamSpec(choices=["none"]),
    "lora.pattern_syntax": ParamSpec(choices=["glob"]),
    "lora.rank_pattern": ParamSpec(choices=[{}]),
    "lora.alpha_pattern": ParamSpec(choices=[{}]),
    "lora.layers_to_transform": ParamSpec(choices=[None]),
    "train.loraplus_lr_ratio": ParamSpec(choices=[None]),
}


def _overrides(space: dict[str, ParamSpec], drawn: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Dotted overrides setting each drawn key to its value, times its `times` key's value in the trial (drawn, else
    the base config's `settings`)."""
    trial_value = {**settings, **drawn}
    return [f"{key}={as_yaml(value * trial_value[space[key].times] if space[key].times else value)}"
            for key, value in drawn.items()]


def sample(trial: optuna.Trial, space: dict[str, ParamSpec], settings: dict[str, Any]) -> list[str]:
    """The overrides that make the base config (its `settings` by dotted key) into the trial's: Optuna draws each
    entry in the space's order."""
    return _overrides(space, {key: spec.draw(trial, key) for key, spec in space.items()}, settings)


def probes(space: dict[str, ParamSpec], settings: dict[str, Any]) -> list[tuple[str, Any, list[str]]]:
    """(key, value, overrides) for every value the space lists: overrides that set it, and the fixed entries, on the
    base config (its `settings`); the loader must accept each. Combinations of drawn values are checked trial by
    trial. ValueError naming the entry for a key that is no setting or is the sweep's own, and for a `times` that
    names no number."""
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        if key not in settings:
            raise ValueError(f"{where}: no such config key (`budgetlora config` lists them)")
        if key in ("name", "runs_dir") or key.startswith("sweep."):  # each trial's place; the sweep's own settings
            raise ValueError(f"{where}: set by the sweep itself, not searchable")
        if spec.times is None:
            continue
        linked = space.get(spec.times)
        if spec.times not in settings or (linked is not None and linked.times is not None):
            raise ValueError(f"{where}.times: {spec.times} is no config key, or is itself relative")
        if not all(map(_number, [*spec.values(), *(linked.values() if linked else [settings[spec.times]])])):
            raise ValueError(f"{where}.times: the values of {key} and of {spec.times} must be numbers")
    fixed = {key: spec.values()[0] for key, spec in space.items() if spec.fixed}
    return [(key, value, _overrides(space, {**fixed, key: value}, settings))
            for key, spec in space.items() for value in spec.values()]


def describe_space(space: dict[str, ParamSpec]) -> str:
    """The space as `budgetlora sweep` prints it: the searched keys, one a line, then the fixed ones."""
    width = max(map(len, space))
    searched = [f"{key:<{width}}  {spec.describe()}" for key, spec in space.items() if not spec.fixed]
    fixed = [f"{key}={spec.describe()}" for key, spec in space.items() if spec.fixed]
    return "\n".join(searched + (["fixed: " + ", ".join(fixed)] if fixed else []))
