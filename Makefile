# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-deps lint cassettes bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# test-deps first: what the suite needs outside .venv (Chromium, chromedriver, curl,
# venv) is installed as root with apt-get, else named with its install command.
test: test-deps $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-deps:
	$(PYTHON) scripts/check_test_deps.py $(TEST_DEPS_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

cassettes: $(BIN)/.installed
	$(BIN)/python scripts/record_cassettes.py

# The gateway under load (BENCHMARKS.md); shorter: make bench BENCH_ARGS="--quick".
bench: $(BIN)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis artifacts
