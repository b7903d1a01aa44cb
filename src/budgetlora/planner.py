"""`budgetlora plan`: adapter shapes that fit the budget, with exact counts, from the model config alone.

Rule, in order: adapt more module types (then more layers) before raising the rank; at equal coverage, a compact head
(the config's own compact head, else the mean of the token states; docs/results.md) before the standard head, and more
of the budget on LoRA. Public results back breadth over rank under a fixed budget (roberta-base on AG News under 1M:
r=2 on query, key, value and both FFN layers beat r=8 on query/value). Each candidate takes the largest rank that
fits. The target sets are the family-neutral presets (targets.py), so the plan works for every encoder family.
"""

from __future__ import annotations

from dataclasses import dataclass

from .budget import ParamReport, count_parameters
from .config import ConfigError, RunConfig, with_overrides
from .heads import COMPACT_HEADS
from .modeling import load_model_config
from .targets import PRESETS

# Best first at equal coverage: a compact head (first_token and mean cost the same: the config's, else mean), then the
# standard head's shape with LoRA on its dense, then the standard head trained in full.
HEAD_CHOICES = ("compact", "lora_dense", "standard")
MAX_RANK = 64
COVERAGE = {"all-linear": 3, "attention": 2, "ffn": 1}
assert set(COVERAGE) == set(PRESETS)


class NoShapeFitsError(Exception):
    """Not even the smallest adapter shape the planner tries fits the budget."""


@dataclass
class Candidate:
    targets: str
    head: str
    layers: list[int] | None  # None: every layer
    rank: int
    report: ParamReport

    @property
    def coverage(self) -> tuple[int, int]:
        return COVERAGE[self.targets], 2 if self.layers is None else 1

    @property
    def layers_label(self) -> str:
        return "all" if self.layers is None else f"{self.layers[0]}-{self.layers[-1]}"

    @property
    def lora_params(self) -> int:
        return self.report.trainable - self.report.groups.get("head", 0)

    @property
    def rank_key(self) -> tuple:
        kind = "compact" if self.head in COMPACT_HEADS else self.head
        return self.coverage, -HEAD_CHOICES.index(kind), self.lora_params

    def overrides(self) -> list[str]:
        return candidate_overrides(self.targets, self.head, self.layers, self.rank)


def candidate_overrides(targets: str, head: str, layers: list[int] | None, rank: int) -> list[str]:
    """The dotted overrides that give a config this adapter shape (alpha = 4r, as in the shipped configs)."""
    return [f"lora.target_modules={targets}", f"lora.r={rank}", f"lora.alpha={4 * rank}", f"model.head={head}",
            "lora.bias=none", "lora.pattern_syntax=glob", "lora.rank_pattern={}", "lora.alpha_pattern={}",
            f"lora.layers_to_transform=[{','.join(map(str, layers))}]" if layers is not None
            else "lora.layers_to_transform=null"]


def plan(config: RunConfig, budget: int) -> list[Candidate]:
    """Every (targets, head, layers) combination at the largest rank within `budget`, best first by the rule above.

    Layers: all of them, or the top half (the layers nearest the head). NoShapeFitsError when none fits, naming the
    smallest shape tried and its count.
    """
    layer_count = load_model_config(config.model, config.data.label_names, shapes_only=True).num_hidden_layers
    compact = config.model.head if config.model.head in COMPACT_HEADS else "mean"
    candidates = []
    smallest: Candidate | None = None  # the cheapest shape tried, at rank 1
    for targets in PRESETS:
        for head in (compact if choice == "compact" else choice for choice in HEAD_CHOICES):
            for layers in (None, list(range(layer_count // 2, layer_count))):
                if head == "lora_dense" and layers is not None:
                    continue  # peft applies layers_to_transform to the head's dense too (see config.py)
                try:  # LoRA parameters grow linearly with r, so two exact counts give every rank
                    one, two = (count_parameters(with_overrides(config, candidate_overrides(targets, head, layers, r)))
                                for r in (1, 2))
                except ConfigError:
                    continue  # a head or preset this family cannot use (the message names it in `params`)
                if smallest is None or one.trainable < smallest.report.trainable:
                    smallest = Candidate(targets, head, layers, 1, one)
                rank = min(MAX_RANK, (budget - one.trainable) // (two.trainable - one.trainable) + 1) \
                    if budget >= one.trainable else 0
                if rank >= 1:
                    report = one if rank == 1 else count_parameters(
                        with_overrides(config, candidate_overrides(targets, head, layers, rank)))
                    candidates.append(Candidate(targets, head, layers, rank, report))
    if not candidates:
        assert smallest is not None  # the presets and the compact heads work on every family the planner loads
        raise NoShapeFitsError(
            f"no adapter shape fits a budget of {budget:,}: the smallest the planner tries ({smallest.targets} on "
            f"layers {smallest.layers_label}, model.head={smallest.head}, r=1) needs {smallest.report.trainable:,} "
            f"trainable parameters. Raise the budget to at least that, or narrow lora.target_modules to fewer "
            f"modules or lora.layers_to_transform to fewer layers and check the count with `budgetlora params`")
    return sorted(candidates, key=lambda c: c.rank_key, reverse=True)


def format_plan(candidates: list[Candidate], budget: int, limit: int) -> str:
    rows = [f"{'#':>3}  {'targets':<11}{'layers':<10}{'head':<12}{'r':>3}{'LoRA':>10}{'head':>10}{'total':>11}"
            f"{'budget':>8}"]
    for i, c in enumerate(candidates[:limit], 1):
        head = c.report.groups.get("head", 0)
        rows.append(f"{i:>3}  {c.targets:<11}{c.layers_label:<10}{c.head:<12}{c.rank:>3}{c.lora_params:>10,}{head:>10,}"
                    f"{c.report.trainable:>11,}{c.report.trainable / budget:>8.1%}")
    rows.append("\noverrides, best first:")
    rows += [f"{i:>3}  {' '.join(c.overrides())}" for i, c in enumerate(candidates[:limit], 1)]
    rows.append(f"\n{len(candidates)} shapes fit {budget:,}; targets are presets (`budgetlora params` shows what each "
                f"matches on this model)")
    return "\n".join(rows)
