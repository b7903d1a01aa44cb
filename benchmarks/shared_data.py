"""Where the benchmarks find the project and the shared data folder beside it (`../shared/data/`, also in CI), and
the labelled texts they score prediction on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # budgetlora imports torch: scripts that import it late (load_test.py) keep doing so
    from budgetlora import runfolder

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "roberta-base-tokenizer"  # roberta-base's tokenizer and config.json (no weights)
AG_NEWS_TRAIN = SHARED / "ag_news" / "train_subset.csv"  # 49,098 real training rows
AG_NEWS_TEST = SHARED / "ag_news" / "test.csv"  # the official test split
COMPETITION = SHARED / "competition" / "test_unlabelled.pkl"  # half AG News test texts, half generated news
DEV_LABELS = SHARED / "competition" / "dev_ood_labels.csv"  # labels of 484 generated texts: a development set


def eval_texts(run: runfolder.Run, test_rows: int | None) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """The official test split's texts and labels (the first test_rows of them) and the 484 labelled generated texts
    of the competition file with theirs."""
    from budgetlora.data import join_labels, load_table

    data = run.config.data
    test = load_table(str(AG_NEWS_TEST), data, labelled=True)
    competition = load_table(str(COMPETITION), data, labelled=False)
    joined = join_labels(competition, str(DEV_LABELS), data)
    texts = competition["text"][:]
    return (test["text"][:][:test_rows], np.asarray(test["label"][:][:test_rows]),
            [texts[i] for i in joined.rows], np.asarray(joined.labels))
