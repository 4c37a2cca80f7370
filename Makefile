# `make run` and `make test` work on a machine with nothing installed: they create .venv with pip
# (torch and torchvision pinned, taken from the local wheel cache when present) and reuse it after.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= params/default.yaml

.PHONY: run test lint setup clean bench bench-gpu

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
	for b in curate trunk train_epoch trunk_cache_read export hamming detect baselines baselines_train hashing_train cached_rerun stage_thread omp_wait; do $(BIN)/python bench/$$b.py; done

# On a machine with a CUDA GPU: every GPU check (tests, detector latency, the pipeline at paper sizes), then the
# README's "GPU figures" from their output (bench/results/gpu.jsonl).
bench-gpu: $(STAMP)
	MAMMO_COMMIT=$$(git rev-parse --short HEAD) bash bench/gpu_device.sh .mammo/gpu $(BIN)/python
	mkdir -p bench/results && cp .mammo/gpu/gpu.jsonl bench/results/gpu.jsonl
	$(BIN)/python bench/gpu_readme.py

clean:
	rm -rf .mammo
