# The two commands of the README. Both install what is missing first (apt and pip).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-serial lint unit e2e lab-down bench clean

setup:
	@bash scripts/setup.sh $(VENV)

## demo: bring the local lab up (3 hosts) and provision the overlay on it; ends with the ping matrix.
demo: setup
	$(BIN)/fab lab-up
	$(BIN)/fab bootstrap-cluster --inventory inventory/lab.yaml

## test: the full suite, as CI runs it: lint, types, unit tests and the lab's own modules,
## then the cluster modules in two streams at once (tests/e2e/streams.py).
test: setup lint
	$(BIN)/pytest -v -ra --durations=10 -m "not cluster"
	$(BIN)/pytest -v -ra --durations=25 -m cluster -n 2 --dist loadgroup

## test-serial: the same tests, one module at a time (~28 min): to read one failure in peace.
test-serial: setup lint
	$(BIN)/pytest -v -ra --durations=25

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit

e2e: setup
	$(BIN)/pytest -v -ra tests/e2e

lab-down: setup
	$(BIN)/fab lab-down

bench: setup
	$(BIN)/python bench/lab_bench.py
	$(BIN)/python bench/bootstrap_bench.py
	$(BIN)/python bench/split_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
