# Two commands, each doing its own set-up on a fresh machine:
#   make train   # creates .venv if missing, installs bpkit, runs the default job (ARGS="..." for overrides)
#   make test    # same set-up, then the default test suite (slow tests: make test-slow)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.bpkit-installed

.PHONY: install train test test-slow clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/bpkit-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun dist build .pytest_cache
