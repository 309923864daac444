# The README's two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup demo test test-all

$(BIN)/graphopt: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[onnx,test]"
	touch $@

setup: $(BIN)/graphopt

demo: setup
	$(BIN)/graphopt demo -o $(OUT)/demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-all: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ""
