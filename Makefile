# The two commands of the README:
#   make demo   set everything up on a fresh machine, then run the demo fleet
#   make test   set everything up, then lint, type-check and run every test
# Set-up is idempotent: llama-server is built once per machine and cached.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test lint llama-server clean

setup: $(INSTALLED) llama-server

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

llama-server: $(INSTALLED)
	$(BIN)/python -m paddler.testbed.llama_server

demo: setup
	$(BIN)/python -m paddler.testbed.demo $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -v

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
