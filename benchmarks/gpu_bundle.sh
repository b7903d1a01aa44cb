#!/usr/bin/env bash
# Packs what benchmarks/gpu_run.sh needs on a GPU machine that can install nothing and does not see ../shared:
# .gpu/wheels (the pure-Python libraries budgetlora is tested with, for that machine's Python 3.12) and .gpu/data (the
# roberta-base tokenizer and config, AG News rows, the competition file). Run it here, then, through the device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=540)
# About 30 MB (under the tool's 64 MiB). `--with-pyarrow` adds pyarrow (+40 MB: then trim the data) for a machine
# whose pyarrow is older than the datasets wheel needs; gpu_run.sh says when.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared/data
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/ag_news .gpu/data/competition
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in transformers peft datasets huggingface_hub tokenizers dill multiprocess; do
  packages+=("$name==$(version "$name")")
done
if [[ "${1:-}" == --with-pyarrow ]]; then packages+=("pyarrow==$(version pyarrow)"); fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "${packages[@]}"
cp -r "$shared/roberta-base-tokenizer" .gpu/data/
# speed.py samples at most 8,422 rows (one epoch of 8,000 training rows end to end): the file's first 20,000 will do.
head -n 20001 "$shared/ag_news/train_subset.csv" > .gpu/data/ag_news/train_subset.csv
cp "$shared/ag_news/test.csv" "$shared/ag_news/classes.txt" .gpu/data/ag_news/
cp "$shared/competition/test_unlabelled.pkl" .gpu/data/competition/
du -sh .gpu
