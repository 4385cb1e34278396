VENV ?= .venv
PY := $(VENV)/bin/python
# Every test has a timeout (pyproject: 120 s) so a hang fails fast. Tests run on
# TEST_WORKERS processes (pytest-xdist): most of a test's time is spent waiting
# (for a TTL, an election, a 60 s outage), so two workers halve the suite even on
# 2 cores. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup:
	@./scripts/setup.sh

run: setup
	$(VENV)/bin/ringfence up $(RUN_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

test: export RINGFENCE_SETUP_TESTS := 1
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
