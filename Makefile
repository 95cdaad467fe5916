# The two quickstart commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint broker clean

$(BIN)/prefsync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/prefsync
	$(BIN)/prefsync demo

lint: $(BIN)/prefsync
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two workers: most of the suite waits on brokers, services and simulators (about 0.8 of a
# core busy with one), so a second worker uses the other core's idle time.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
