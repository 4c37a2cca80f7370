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

# Two xdist workers: the slow tests mostly wait on `python -m flows.cli` subprocesses and Prefect servers;
# tests/conftest.py keeps each file (and the files sharing a session fixture) on one worker. --durations: the
# CI log then names the slowest tests (the last one had no such list).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30 tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in curate trunk train_epoch export hamming detect baselines baselines_train hashing_train cached_rerun stage_thread omp_wait; do $(BIN)/python bench/$$b.py; done

clean:
	rm -rf .mammo
