# Two commands a user needs: `make demo` and `make test`. Both create .venv and install if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/laiontools demo --output demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/pip install -q ruff && $(BIN)/ruff check laiontools jobs tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo-out bench-out .pytest_cache
