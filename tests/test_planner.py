"""`budgetlora plan`: every candidate fits the budget at its largest rank, and its overrides reproduce its count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from budgetlora.budget import count_parameters
from budgetlora.cli import main
from budgetlora.config import RunConfig, load_config
from budgetlora.heads import COMPACT_HEADS
from budgetlora.planner import HEAD_CHOICES, MAX_RANK, Candidate, NoShapeFitsError, plan

BUDGET = 5000


@pytest.fixture(scope="module")
def candidates(tiny_roberta_dir: Path) -> tuple[RunConfig, list[Candidate]]:
    config = load_config(None, [f"model.name={tiny_roberta_dir}"])
    return config, plan(config, BUDGET)


def from_overrides(config: RunConfig, candidate: Candidate, *extra: str) -> RunConfig:
    """The config a user gets by pasting the candidate's overrides (plus `extra`) on the command line."""
    return load_config(None, [f"model.name={config.model.name}", *candidate.overrides(), *extra])


def test_every_candidate_fits_at_its_largest_rank(candidates: tuple[RunConfig, list[Candidate]]) -> None:
    config, found = candidates
    assert len(found) >= 10
    for candidate in found:
        assert 1 <= candidate.rank <= MAX_RANK
        assert candidate.report.trainable <= BUDGET
        if candidate.rank < MAX_RANK:
            one_more = from_overrides(config, candidate, f"lora.r={candidate.rank + 1}")
            assert count_parameters(one_more).trainable > BUDGET, candidate.overrides()


def test_candidate_overrides_reproduce_the_count(candidates: tuple[RunConfig, list[Candidate]]) -> None:
    config, found = candidates
    for candidate in found:
        report = count_parameters(from_overrides(config, candidate))
        assert report.trainable == candidate.report.trainable, candidate.overrides()
        assert report.groups == candidate.report.groups


def test_candidates_are_ordered_by_coverage_then_head_then_lora_share(
        candidates: tuple[RunConfig, list[Candidate]]) -> None:
    _, found = candidates
    kinds = ["compact" if candidate.head in COMPACT_HEADS else candidate.head for candidate in found]
    keys = [(candidate.coverage, -HEAD_CHOICES.index(kind), candidate.lora_params)
            for candidate, kind in zip(found, kinds, strict=True)]
    assert keys == sorted(keys, reverse=True)
    assert (found[0].targets, found[0].head, found[0].layers) == ("all-linear", "mean", None)


def test_the_compact_head_planned_is_the_configs_own(candidates: tuple[RunConfig, list[Candidate]]) -> None:
    config, found = candidates
    first_token = plan(load_config(None, [f"model.name={config.model.name}", "model.head=first_token"]), BUDGET)
    assert {c.head for c in first_token} == {"first_token", "lora_dense", "standard"}
    assert [(c.targets, c.layers, c.rank, c.report.trainable) for c in first_token] == \
        [(c.targets, c.layers, c.rank, c.report.trainable) for c in found]  # first_token costs what mean costs
    assert all(f"lora.alpha={4 * c.rank}" in c.overrides() for c in found)  # as the shipped configs and the sweep


def test_cli_plan_lists_the_candidates(tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", str(BUDGET), "--top", "3", f"model.name={tiny_roberta_dir}"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\s+[123]\s+\S", line)]
    assert len(rows) == 6  # three table rows and three override lines
    assert f"shapes fit {BUDGET:,}" in out


def test_no_shape_fits_names_the_smallest_count(candidates: tuple[RunConfig, list[Candidate]]) -> None:
    config, _ = candidates
    with pytest.raises(NoShapeFitsError, match="Raise the budget") as refused:
        plan(config, 10)
    smallest = int(re.search(r"needs ([\d,]+) trainable", str(refused.value)).group(1).replace(",", ""))
    assert plan(config, smallest)  # the count given is exactly the least that fits
    with pytest.raises(NoShapeFitsError):
        plan(config, smallest - 1)


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_cli_plan_refuses_a_budget_below_one(budget: str, tiny_roberta_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", budget, f"model.name={tiny_roberta_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"budget: must be > 0, got {budget}" in err, err


def test_cli_plan_says_when_no_shape_fits(tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", "10", f"model.name={tiny_roberta_dir}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no adapter shape fits a budget of 10" in captured.err, captured.err
    assert "Raise the budget" in captured.err and "lora.target_modules" in captured.err
