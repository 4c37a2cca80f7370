# `make run` and `make test` work on a machine with nothing installed: they create .venv with pip
# (torch and torchvision pinned, taken from the local wheel cache when present) and reuse it after.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= params/default.yaml

.PHONY: run test lint setup clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mammo run -p $(PARAMS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in curate trunk train_epoch export hamming detect baselines baselines_train hashing_train cached_rerun; do $(BIN)/python bench/$$b.py; done

clean:
	rm -rf .mammo
