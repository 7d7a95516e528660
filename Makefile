# Two entry points for a fresh clone: `make run` and `make test`. Everything they need is
# installed here, so CI (which runs `make test` on a clean checkout) needs nothing else.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# This machine's pip.conf names local wheel indexes that may not exist; its warnings are noise.
PIPQUIET := { grep -v '^WARNING: Location' || true; }

.PHONY: venv run test lint slurm bench bench-kernels bench-staging bench-events bench-scheduling bench-orchestration clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | $(PIPQUIET)
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/clusterflow run

lint: venv
	$(BIN)/ruff check .

# A real single-node Slurm for the slurm backend: installs Debian's slurm-wlm when root and
# missing, writes a config under .clusterflow/slurm, starts munge/slurmctld/slurmd. Idempotent.
slurm: venv
	$(BIN)/python -m infra.clusters.slurm_local up

test: venv lint slurm
	$(BIN)/python -m pytest -q

# Benchmarks print ratios measured side by side in one run; results go to bench/results/.
bench: bench-kernels bench-staging bench-events bench-scheduling bench-orchestration

bench-kernels: venv
	$(BIN)/python bench/kernels_heat.py
	$(BIN)/python bench/kernels_kmer.py
	$(BIN)/python bench/kernels_kmer_long.py
	$(BIN)/python bench/kernels_kmer_tools.py
	$(BIN)/python bench/mpi_pingpong.py
	$(BIN)/python bench/kernels_plot.py

bench-staging: venv
	$(BIN)/python bench/staging.py

bench-events: venv
	$(BIN)/python bench/fanout.py

bench-scheduling: venv slurm
	$(BIN)/python bench/scheduling_overhead.py --jobs 20

bench-orchestration: venv slurm
	$(BIN)/python bench/steps_overhead.py

clean:
	rm -rf .clusterflow
