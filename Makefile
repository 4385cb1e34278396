VENV ?= .venv
PY := $(VENV)/bin/python
# Every test has a timeout (pyproject: 120 s) so a hang fails fast.
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup:
	@./scripts/setup.sh

run: setup
	$(VENV)/bin/ringfence up $(RUN_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
