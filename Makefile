# The quick start: `make run` serves the API, `make test` runs the whole test suite.
# Both install what they need into .venv first, pinned by constraints.txt. Another
# Python beside it: `make test PYTHON=python3.13 VENV=.venv313`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: run test test-unit test-integration test-e2e lint install lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/taskctl dev

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# One tier at a time: no I/O; a real PostgreSQL; real processes (nginx, Chromium).
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

# ruff with the rules of pyproject.toml ([tool.ruff]); the CI runs it before the tests.
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check .

# Re-pin every dependency after changing pyproject.toml.
lock:
	rm -rf /tmp/taskservice-lock && $(PYTHON) -m venv /tmp/taskservice-lock
	/tmp/taskservice-lock/bin/pip install --quiet '.[test,lint]'
	/tmp/taskservice-lock/bin/pip freeze --exclude taskservice > constraints.txt

clean:
	rm -rf $(VENV) .data
