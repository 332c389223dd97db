# `make demo` and `make test` work on a fresh machine with only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := $(VENV)/.extras

.PHONY: demo test lint format bench clean

# pip -qq: errors only (a machine's pip configuration may warn about every package it looks up);
# PYTHONWARNINGS: setuptools' backend warns about every editable install of a flat layout
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -qq -e '.[test,lint]'
	touch $(STAMP)

# optional extras whose code the tests cover (matplotlib for the sensitivity plot, torch for onnxcomp qat,
# ray for the sharded-calibration tests)
$(EXTRAS): $(STAMP)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -qq -e '.[test,lint,plot,train,distributed]'
	touch $(EXTRAS)

demo: $(STAMP)
	$(BIN)/python models/demo.py

test: $(EXTRAS)
	$(BIN)/python -m pytest -q

# ruff (lint + format check) and mypy on the package; CI runs it before the tests.
# mypy checks the optional engines' code against the extras' type information (torch, ray)
lint: $(EXTRAS)
	$(BIN)/ruff check onnxcomp tests models bench
	$(BIN)/ruff format --check onnxcomp tests models bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --select I --fix onnxcomp tests models bench
	$(BIN)/ruff format onnxcomp tests models bench

bench: $(STAMP)
	$(BIN)/python bench/formats.py

clean:
	rm -rf $(VENV) out .pytest_cache
