# The two commands of the README: `make train` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test lint

$(BIN)/mixcon: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,yaml,triton,eval,hf]"
	touch $(BIN)/mixcon

setup: $(BIN)/mixcon

# Train the `small` preset on the default corpus (Python's own standard library) for a bounded
# time, then print a sample and where the checkpoint and loss plot are.
train: setup
	$(BIN)/mixcon train --config small --time-budget 480 --out runs/small --overwrite

test: setup
	$(BIN)/ruff check mixcon tests
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check mixcon tests
