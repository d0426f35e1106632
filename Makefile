# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Two test processes, each taking whole files (module fixtures are built once): much of the
# suite waits on real workers, browsers and PACS round trips, so two processes on two cores
# take half the time of one (docs/benchmarks.md, "The test suite"). PYTEST_ARGS="" runs one.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: run test lint dev-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

run: $(STAMP)  ## Run the whole service locally (SQLite, embedded Redis, 1 worker, web on :5000)
	$(BIN)/python scripts/run_local.py

test: $(TEST_STAMP)  ## Install test dependencies and run the whole suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

dev-model: $(STAMP)  ## Write an UNTRAINED ResNet50 artifact to models/dev (development only)
	$(BIN)/python -m ml.model --init models/dev
	$(BIN)/python -m ml.training.gate --model models/dev --quick

clean:
	rm -rf $(VENV) instance .pytest_cache
