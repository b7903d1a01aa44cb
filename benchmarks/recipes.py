"""Accuracy for the same budget: recipes on MiniLM (real weights), same rows, same epochs, official AG News test split.

    python benchmarks/recipes.py   # every recipe at seed 42, then a second seed for the top two and the default

Each recipe is a config in configs/recipes/ (all at 0.8% of MiniLM's parameters, 182,000, as 1M is of roberta-base);
`budgetlora train --config C train.seed=S` and `budgetlora evaluate --run R --data ../shared/data/ag_news/test.csv`
reproduce any row. The top two by validation accuracy, and the shipped default's recipe, get the further seeds.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

from recipe_runs import RecipeResult, run_recipe
from table import markdown_table

RECIPES = [
    "configs/recipes/minilm-reference.yaml",
    "configs/recipes/minilm-all-linear.yaml",
    "configs/recipes/minilm-mean-head.yaml",
    "configs/recipes/minilm-tuned.yaml",
    "configs/recipes/minilm-sweep-best.yaml",
    "configs/recipes/minilm-no-dropout.yaml",
]
# The recipe of configs/quickstart.yaml and configs/roberta-base-agnews.yaml: always measured over every seed.
DEFAULT_RECIPE = "configs/recipes/minilm-no-dropout.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43],
                        help="first: all recipes; rest: the top two and the default")
    args = parser.parse_args()
    first, *more = args.seeds
    results: dict[str, list[RecipeResult]] = {}
    for recipe in args.recipes:
        results[recipe] = [run_recipe(recipe, first)]
        print(f"{recipe} seed {first}: test {results[recipe][0].test_accuracy:.4f}", flush=True)
    top_two = sorted(results, key=lambda r: -results[r][0].validation_accuracy)[:2]
    for recipe in [r for r in results if r in top_two or r == DEFAULT_RECIPE]:
        results[recipe] += [run_recipe(recipe, seed) for seed in more]

    reference = statistics.mean(r.test_accuracy for r in results[args.recipes[0]])
    rows = []
    for recipe, runs in results.items():
        tests = [r.test_accuracy for r in runs]
        rows.append([
            f"`{recipe.removeprefix('configs/recipes/')}`", f"{runs[0].trainable:,}",
            ",".join(str(r.seed) for r in runs),
            f"{statistics.mean(r.validation_accuracy for r in runs):.2%}",
            f"{statistics.mean(tests):.2%}" + (f" ({min(tests):.2%}-{max(tests):.2%})" if len(tests) > 1 else ""),
            f"{(statistics.mean(tests) - reference) * 100:+.2f}",
            f"{statistics.mean(r.wall_s for r in runs):.0f} s",
        ])
    print()
    print(markdown_table(["recipe", "trainable", "seeds", "validation acc", "test acc (range)",
                          "vs reference (points)", "train+test wall"], rows))


if __name__ == "__main__":
    main()
