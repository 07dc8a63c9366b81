# The two commands a newcomer types: `make run` (set up + demo pipeline) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, held by a constraints file through every install step, so that no later step pulls a
# multi-GB CUDA build on CPU machines. On a GPU machine: make CONSTRAINTS= TORCH=torch (keeps pip's CUDA build).
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
ARGS ?=

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_C) -e ".[dev]"
	$(PY) -m pip list 2>/dev/null | grep -i "^torch "
	touch $@

run: setup
	$(VENV)/bin/dicl pipeline configs/demo.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf outputs .pytest_cache
