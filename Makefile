# Two commands, each doing its own set-up on a fresh machine:
#   make train   # creates .venv if missing, installs bpkit, runs the default job (ARGS="..." for overrides)
#   make test    # same set-up, then the default test suite (slow tests: make test-slow)
#   make docs    # same set-up plus the docs extra, then the documentation site, warnings as errors (build/site)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.bpkit-installed
DOCS_STAMP := $(VENV)/.bpkit-docs-installed

.PHONY: install train test test-slow docs docs-serve clean

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

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf outputs multirun dist build .pytest_cache
