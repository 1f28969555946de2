# Two commands for a fresh machine (see README.md):
#   make demo   set everything up, then serve the tiny demo model through the supervisor
#   make test   set everything up, then run ruff, mypy --strict and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: all venv llama-server lint test demo bench clean

all: test

# The venv is rebuilt when pyproject.toml changes. llama-cpp-python (the `llama` extra) has no
# binary wheel here: pip builds it from source once (about 6 minutes) and caches the wheel.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,llama]'
	touch $@

venv: $(VENV)/.installed

# llama.cpp's own server, built offline from the sources vendored in the llama-cpp-python sdist
# into ~/.cache/llama-supervisor/build (reused when present).
llama-server: venv
	PYTHON=$(BIN)/python scripts/build-llama-server

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv llama-server lint
	LLAMA_SERVER_BIN="$$(PYTHON=$(BIN)/python scripts/build-llama-server)" $(BIN)/python -m pytest

# The demo's config names the command `llama-server`: the one built above goes first on PATH.
demo: venv llama-server
	PATH="$$(dirname "$$(PYTHON=$(BIN)/python scripts/build-llama-server)"):$$PATH" \
	  $(BIN)/llama-supervisor serve --config config/demo.toml

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
