"""Turn a sweep's best.yaml into a recipe config: the recipe's rows and split, the sweep's adapter and schedule.

    python scripts/sweep_to_recipe.py runs/minilm-sweep/best.yaml configs/recipes/minilm-mean-head.yaml \
        configs/recipes/minilm-sweep-best.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from budgetlora.config import dump_config, load_config, with_overrides


def main(best: str, recipe: str, out: str) -> None:
    found, base = load_config(best), load_config(recipe)
    values = base.to_dict()
    # The sweep searched on a smaller sample: the recipe's data and training length (JSON is YAML, as overrides read).
    found = with_overrides(found, [f"data={json.dumps(values['data'])}", f"runs_dir={json.dumps(values['runs_dir'])}",
                                   f"name={json.dumps(Path(out).stem)}",
                                   f"train.epochs={json.dumps(values['train']['epochs'])}",
                                   f"train.max_steps={json.dumps(values['train']['max_steps'])}"])
    header = Path(best).read_text().splitlines()[0]
    Path(out).write_text(f"{header}, on the rows of {recipe}\n# made by: python scripts/sweep_to_recipe.py "
                         f"{best} {recipe} {out}\n" + dump_config(found))
    load_config(out)  # the written recipe loads and validates as a config


if __name__ == "__main__":
    main(*sys.argv[1:])
