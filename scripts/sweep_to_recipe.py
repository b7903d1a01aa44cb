"""Turn a sweep's best.yaml into a recipe config: the recipe's rows and split, the sweep's adapter and schedule.

    python scripts/sweep_to_recipe.py runs/minilm-sweep/best.yaml configs/recipes/minilm-mean-head.yaml \
        configs/recipes/minilm-sweep-best.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from budgetlora.config import dump_config, load_config


def main(best: str, recipe: str, out: str) -> None:
    found, base = load_config(best), load_config(recipe)
    found.data, found.runs_dir = base.data, base.runs_dir  # the sweep searched on a smaller sample
    found.name = Path(out).stem
    found.train.epochs, found.train.max_steps = base.train.epochs, base.train.max_steps
    header = Path(best).read_text().splitlines()[0]
    Path(out).write_text(f"{header}, on the rows of {recipe}\n# made by: python scripts/sweep_to_recipe.py "
                         f"{best} {recipe} {out}\n" + dump_config(found))
    load_config(out)  # the written recipe loads and validates as a config


if __name__ == "__main__":
    main(*sys.argv[1:])
