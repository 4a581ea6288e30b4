# Quick start: `make run` and `make test`. Each builds .venv first if it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.canaryflow-installed
WORKDIR ?= .canaryflow
# Two workers on the 2-core machine: much of the suite waits on servers and subprocesses. Modules stay whole
# on one worker, the longest first (tests/conftest.py); PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadgroup --no-loadscope-reorder

.PHONY: run test test-fast compile bench clean venv

venv: $(STAMP)

# torch goes first and pinned: pip then takes the local CPU wheel, where a loose spec pulled in by
# another package would download a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/canaryflow run --workdir $(WORKDIR)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

compile: $(STAMP)
	$(BIN)/canaryflow compile -o canaryflow-pipeline.yaml

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/data_stage.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/training_cpu.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pretrained_cpu.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/evaluation.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/canary.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/canary_under_load.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/router.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/run_make_run.py

clean:
	rm -rf $(WORKDIR) canaryflow-pipeline.yaml .pytest_cache
