# The two commands of the README:
#   make demo   set everything up on a fresh machine, then run the demo fleet
#   make test   set everything up, then lint, type-check and run every test
# Set-up is idempotent: llama-server is built once per machine and cached.
#   make packages   build the .deb and .rpm into dist/ (docs/packages.md)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test lint llama-server compiled test-tools packages clean

setup: $(INSTALLED) compiled llama-server

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The balancer's hot path compiled with mypyc (packaging/compile_hot_path.py): compiled
# again when a source changed, and nothing done otherwise. Without a C compiler or the
# Python headers the demo runs pure Python, and says so; the tests need it compiled.
compiled: $(INSTALLED)
	$(BIN)/python packaging/compile_hot_path.py --optional

llama-server: $(INSTALLED)
	$(BIN)/python -m paddler.testbed.llama_server

# What the tests need from Debian: dpkg-deb is always there, rpmbuild and rpm2cpio come
# with rpm, the package tests debootstrap a root of their own, and the dashboard's test
# takes its screenshot with Chromium.
TEST_TOOLS := debootstrap rpmbuild rpm2cpio cpio chromium
TEST_PACKAGES := debootstrap rpm cpio chromium
test-tools:
	@missing="$$(for tool in $(TEST_TOOLS); do \
	    command -v $$tool >/dev/null || echo $$tool; done)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(TEST_PACKAGES) from Debian's packages"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES) >/dev/null; \
	  else \
	    echo "missing $$missing: the tests that need them (root too) will be skipped"; \
	  fi; \
	fi

packages: $(INSTALLED) test-tools
	$(BIN)/python packaging/build.py

demo: setup
	$(BIN)/python -m paddler.testbed.demo $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint test-tools
	$(BIN)/python packaging/compile_hot_path.py
	$(BIN)/pytest -v

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build/mypyc paddler/_compiled.json
	find paddler -name '*.so' -delete
