"""Redraw the vendored quickstart sample (data/quickstart/) from ../shared/data/ag_news/: seeded and stratified."""

from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ag_news"
OUT = Path(__file__).resolve().parents[1] / "data" / "quickstart"


def main() -> None:
    train = pd.read_csv(SHARED / "train_subset.csv")
    test = pd.read_csv(SHARED / "test.csv", header=None, names=["cls", "title", "description"], dtype=str,
                       keep_default_na=False)
    test = pd.DataFrame({"text": test.title + " " + test.description, "label": test.cls.astype(int) - 1})
    train_sample, _ = train_test_split(train, train_size=2000, stratify=train.label, random_state=0)
    test_sample, _ = train_test_split(test, train_size=500, stratify=test.label, random_state=0)
    train_sample.to_csv(OUT / "train.csv", index=False)
    test_sample.to_csv(OUT / "test.csv", index=False)


if __name__ == "__main__":
    main()
