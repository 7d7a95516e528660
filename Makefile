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

.PHONY: venv run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | $(PIPQUIET)
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/clusterflow run

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf .clusterflow
