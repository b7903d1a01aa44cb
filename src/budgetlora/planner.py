"""`budgetlora plan`: adapter shapes that fit the budget, with exact counts, from the model config alone.

Rule, in order: adapt more module types (then more layers) before raising the rank; at equal coverage, spend more of
the budget on LoRA rather than on the head. Public results back breadth over rank under a fixed budget (roberta-base on
AG News under 1M: r=2 on query, key, value and both FFN layers beat r=8 on query/value). Each candidate takes the
largest rank that fits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import AutoConfig

from .budget import ParamReport, count_parameters
from .config import RunConfig
from .modeling import resolve_model_path

TARGET_SETS: dict[str, list[str]] = {
    "all-linear": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "layer.*.output.dense"],
    "attention": ["query", "key", "value", "attention.output.dense"],
    "qkv+ffn": ["query", "key", "value", "intermediate.dense", "layer.*.output.dense"],
    "ffn": ["intermediate.dense", "layer.*.output.dense"],
    "qkv": ["query", "key", "value"],
    "qv": ["query", "value"],
}
HEAD_CHOICES = ("standard", "mean", "lora_dense")  # first_token costs what mean costs
MAX_RANK = 64


@dataclass
class Candidate:
    targets: str
    head: str
    layers: list[int] | None  # None: every layer
    rank: int
    report: ParamReport

    @property
    def coverage(self) -> tuple[int, int]:
        return len(TARGET_SETS[self.targets]), 2 if self.layers is None else 1

    @property
    def layers_label(self) -> str:
        return "all" if self.layers is None else f"{self.layers[0]}-{self.layers[-1]}"

    @property
    def lora_params(self) -> int:
        return self.report.trainable - self.report.groups.get("head", 0)

    def overrides(self) -> str:
        parts = [f"lora.target_modules=[{','.join(TARGET_SETS[self.targets])}]", f"lora.r={self.rank}",
                 f"lora.alpha={2 * self.rank}", f"model.head={self.head}", "lora.bias=none"]
        if self.layers is not None:
            parts.append(f"lora.layers_to_transform=[{','.join(map(str, self.layers))}]")
        return " ".join(parts)


def _variant(config: RunConfig, targets: str, head: str, layers: list[int] | None, rank: int) -> RunConfig:
    variant = copy.deepcopy(config)
    variant.lora.target_modules = TARGET_SETS[targets]
    variant.lora.pattern_syntax = "glob"
    variant.lora.r, variant.lora.bias = rank, "none"
    variant.lora.layers_to_transform, variant.lora.rank_pattern, variant.lora.alpha_pattern = layers, {}, {}
    variant.model.head = head
    return variant


def plan(config: RunConfig, budget: int) -> list[Candidate]:
    """Every (targets, head, layers) combination at the largest rank within `budget`, best first by the rule above.

    Layers: all of them, or the top half (the layers nearest the head).
    """
    layer_count = AutoConfig.from_pretrained(resolve_model_path(config.model.name)).num_hidden_layers
    candidates = []
    for targets in TARGET_SETS:
        for head in HEAD_CHOICES:
            for layers in (None, list(range(layer_count // 2, layer_count))):
                if head == "lora_dense" and layers is not None:
                    continue  # peft applies layers_to_transform to the head's dense too (see config.py)
                # LoRA parameters grow linearly with r, so two exact counts give every rank; the pick is recounted.
                one, two = (count_parameters(_variant(config, targets, head, layers, r)).trainable for r in (1, 2))
                rank = min(MAX_RANK, (budget - one) // (two - one) + 1) if budget >= one else 0
                if rank >= 1:
                    report = count_parameters(_variant(config, targets, head, layers, rank))
                    candidates.append(Candidate(targets, head, layers, rank, report))
    return sorted(candidates, key=lambda c: (c.coverage, c.lora_params), reverse=True)


def format_plan(candidates: list[Candidate], budget: int, limit: int) -> str:
    rows = [f"{'#':>3}  {'targets':<11}{'layers':<10}{'head':<12}{'r':>3}{'LoRA':>10}{'head':>10}{'total':>11}"
            f"{'budget':>8}"]
    for i, c in enumerate(candidates[:limit], 1):
        head = c.report.groups.get("head", 0)
        rows.append(f"{i:>3}  {c.targets:<11}{c.layers_label:<10}{c.head:<12}{c.rank:>3}{c.lora_params:>10,}{head:>10,}"
                    f"{c.report.trainable:>11,}{c.report.trainable / budget:>8.1%}")
    rows.append("\noverrides, best first:")
    rows += [f"{i:>3}  {c.overrides()}" for i, c in enumerate(candidates[:limit], 1)]
    rows.append(f"\n{len(candidates)} shapes fit {budget:,}; targets: "
                + "; ".join(f"{name} = {', '.join(t)}" for name, t in TARGET_SETS.items()))
    return "\n".join(rows)
