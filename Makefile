# Two commands a user needs: `make demo` and `make test`. Both create .venv and install if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml setup.py laiontools/wds/tarfast.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/laiontools demo --output demo-out

# The suite in TEST_WORKERS processes (pytest-xdist), a whole test file at a time in each, so that a
# file's fixtures are made once (tests/conftest.py orders and groups the files). Its time is mostly JVMs
# and Python processes starting: run in one process it left ~37 % of this 2-core machine's CPU idle.
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check laiontools jobs tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo-out bench-out .pytest_cache
