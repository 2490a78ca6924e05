# The README's verbs. Everything installs into .venv on first use, one line per step;
# pip's own output goes to $(VENV)/install.log (its tail is shown if a step fails).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8080
LOG    := $(VENV)/install.log
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
QUIET  = >>$(LOG) 2>&1 || { tail -n 20 $(LOG); exit 1; }

.PHONY: run test test-all lint bench redis-server clean

$(BIN)/python:
	@echo "make: creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip $(QUIET)

# boto3 too, so the example `make run` prints runs as is with $(BIN)/python.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "make: installing sluice and boto3 into $(VENV) (log: $(LOG))"
	@$(PIP) -e . boto3 $(QUIET)
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "make: installing sluice with its test and dev tools into $(VENV) (log: $(LOG))"
	@$(PIP) -e '.[test,dev]' $(QUIET)
	@touch $@ $(VENV)/.installed

## run: Sluice on http://127.0.0.1:$(PORT) in front of the built-in Bedrock simulator
## (`make run PORT=9000` for another port; Ctrl-C stops it)
run: $(VENV)/.installed
	@echo "make: starting Sluice on port $(PORT); Ctrl-C stops it"
	@$(BIN)/sluice serve --upstream simulator --port $(PORT)

## test: the suite but its `long` runs (starts its own redis-server processes and cluster)
test: $(VENV)/.installed-dev redis-server
	@echo "make: running the test suite (without the long runs: make test-all)"
	@$(BIN)/python -m pytest -q -m "not long"

## test-all: the whole suite, the long runs included (sweep seed, kill -9, incidents)
test-all: $(VENV)/.installed-dev redis-server
	@echo "make: running the whole test suite"
	@$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/passthrough.py

# The tests start real redis-server processes; install Redis when it is missing.
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "make: installing redis-server (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq >/dev/null && \
	  $$SUDO apt-get install -y -qq redis-server redis-tools >/dev/null; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
