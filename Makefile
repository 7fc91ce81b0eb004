# `make run`: set up and run the whole pipeline on the default data (digits).
# `make test`: set up and run the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stage commands (`shrinkflow stage NAME`) must resolve to this venv.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES := 1

.PHONY: setup run test test-fast clean serve

setup: $(VENV)/.installed

# torch is pinned through constraints.txt so pip takes the CPU wheel, never a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

run: setup
	dvc repro
	shrinkflow metrics

test: setup
	python -m pytest -q

test-fast: setup
	python -m pytest -q -m "not slow"

# Local Prefect server + worker + deployments (compress/local, retrain/nightly); Ctrl-C or SIGTERM
# stops all. PORT=4300 make serve; SERVE_ARGS="--poll 1 --root DIR" passes options of shrinkflow serve.
serve: setup
	shrinkflow serve --port $(or $(PORT),4200) $(SERVE_ARGS)

clean:
	rm -rf data/prepared models reports .dvc/tmp
