# The two commands a newcomer types: `make run` (set up + demo pipeline) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; pinned so pip does not pull a multi-GB CUDA build on CPU machines.
# On a GPU machine: make TORCH="torch" (keeps the CUDA build that pip picks).
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/dicl pipeline configs/demo.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf outputs .pytest_cache
