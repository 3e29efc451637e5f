# The README's commands. `make demo` trains the embedded default, `make demo-cond` its class-conditional twin;
# `make test` runs the whole suite.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: demo demo-cond test test-fast reliability bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/dcgan-train --config configs/mnist5k.yaml run.dir=runs/demo --overwrite
	@echo "samples:    runs/demo/samples/ (final grid: the highest step-*.png)"
	@echo "checkpoint: runs/demo/checkpoints/$$(cat runs/demo/checkpoints/latest)"
	@echo "more:       $(BIN)/dcgan-sample runs/demo --num 64 --out runs/demo/grid.png"

demo-cond: $(VENV)/.installed  # class-conditional: one row per digit in the grids
	$(BIN)/dcgan-train --config configs/mnist5k_cond.yaml run.dir=runs/demo_cond --overwrite
	@echo "samples:    runs/demo_cond/samples/ (one row per class; final grid: the highest step-*.png)"
	@echo "checkpoint: runs/demo_cond/checkpoints/$$(cat runs/demo_cond/checkpoints/latest)"
	@echo "a digit:    $(BIN)/dcgan-sample runs/demo_cond --num 64 --class 7 --out runs/demo_cond/sevens.png"

# Unit tests, then the multi-process tests (marked slow), then the real SLURM cluster (needs root).
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not cluster" -q
	bash tests/cluster/run.sh

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow and not cluster" -q

reliability: $(VENV)/.installed-dev  # the fault-injection suite -> docs/RELIABILITY.md
	$(BIN)/python tests/faults/report.py

bench: $(VENV)/.installed-dev
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf runs/demo runs/demo_cond .pytest_cache
