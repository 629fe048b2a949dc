# The two commands of the README:
#   make demo   set everything up on a fresh machine, then run the demo fleet
#   make test   set everything up, then lint, type-check and run every test
# Set-up is idempotent: llama-server is built once per machine and cached.
#   make packages   build the .deb and .rpm into dist/ (docs/packages.md)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test lint llama-server package-tools packages clean

setup: $(INSTALLED) llama-server

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

llama-server: $(INSTALLED)
	$(BIN)/python -m paddler.testbed.llama_server

# What building and testing the packages needs from Debian: dpkg-deb is always there,
# rpmbuild and rpm2cpio come with rpm, and the tests debootstrap a root of their own.
package-tools:
	@missing="$$(for tool in debootstrap rpmbuild rpm2cpio cpio; do \
	    command -v $$tool >/dev/null || echo $$tool; done)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing debootstrap, rpm and cpio from Debian's packages"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap rpm cpio >/dev/null; \
	  else \
	    echo "the package tests need root and debootstrap, rpm and cpio: they will be skipped"; \
	  fi; \
	fi

packages: $(INSTALLED) package-tools
	$(BIN)/python packaging/build.py

demo: setup
	$(BIN)/python -m paddler.testbed.demo $(ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint package-tools
	$(BIN)/pytest -v

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
