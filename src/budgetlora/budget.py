"""Exact trainable-parameter counts from the model config alone, per group, checked against the budget.

The count comes from the real `get_peft_model` applied to a model built on the meta device, so it is peft's own
count by construction, yet needs no weights and no memory (roberta-base: about 0.2 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig
from .modeling import build_peft_model
from .targets import TargetMatch

GROUPS = ("lora_A", "lora_B", "lora_magnitude", "lora_embedding", "bias", "head", "other")


class BudgetError(ValueError):
    """The configuration trains more parameters than the budget allows."""


def parameter_group(name: str) -> str:
    """The budget group of a trainable parameter, from its peft name."""
    if "modules_to_save" in name:
        return "head"
    for group in ("lora_A", "lora_B"):
        if f".{group}." in name:
            return group
    if ".lora_magnitude_vector." in name:  # DoRA
        return "lora_magnitude"
    if "lora_embedding" in name:
        return "lora_embedding"
    if name.endswith(".bias"):
        return "bias"
    return "other"


@dataclass
class ParamReport:
    """Trainable parameters per group, the total against the budget, and what each target pattern matched."""

    groups: dict[str, int]
    total_params: int
    budget: int
    targets: TargetMatch

    @property
    def trainable(self) -> int:
        return sum(self.groups.values())

    @property
    def within_budget(self) -> bool:
        return self.trainable <= self.budget

    def format(self) -> str:
        rows = [f"{'group':<16}{'parameters':>12}{'share':>9}"]
        for group, count in self.groups.items():
            rows.append(f"{group:<16}{count:>12,}{count / max(self.trainable, 1):>9.1%}")
        verdict = "within budget" if self.within_budget else f"OVER BUDGET by {self.trainable - self.budget:,}"
        rows += [
            f"{'trainable':<16}{self.trainable:>12,}",
            f"budget {self.budget:,}: {self.trainable / self.budget:.1%} used, {verdict}",
            f"({self.trainable / self.total_params:.3%} of all {self.total_params:,} parameters)",
            "target patterns:",
            self.targets.summary(),
        ]
        return "\n".join(rows)


def count_parameters(config: RunConfig) -> ParamReport:
    """Count trainable parameters per group without loading any weights."""
    model, match = build_peft_model(config, config.data.label_names, meta=True)
    groups = dict.fromkeys(GROUPS, 0)
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            groups[parameter_group(name)] += param.numel()
    return ParamReport({k: v for k, v in groups.items() if v}, total, config.budget, match)


def check_budget(config: RunConfig) -> ParamReport:
    """Count and raise BudgetError, with the per-group breakdown, when the budget is exceeded."""
    report = count_parameters(config)
    if not report.within_budget:
        raise BudgetError(f"{report.trainable:,} trainable parameters exceed the budget of {report.budget:,}:\n"
                          f"{report.format()}")
    return report
