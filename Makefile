# The README's verbs. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench redis-server clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# boto3 too, so the example `make run` prints runs as is with $(BIN)/python.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e . boto3
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $@ $(VENV)/.installed

## run: Sluice on http://127.0.0.1:8080 in front of the built-in Bedrock simulator
run: $(VENV)/.installed
	$(BIN)/sluice serve --upstream simulator

## test: the whole suite (starts its own redis-server processes and cluster)
test: $(VENV)/.installed-dev redis-server
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/passthrough.py

# The tests start real redis-server processes; install Redis when it is missing.
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server redis-tools; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
