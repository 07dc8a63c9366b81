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
# The suite in two pytest-xdist processes, a test file to each at a time: the tests wait on Ray's processes starting
# as much as they compute, so one process left a quarter of 2 cores idle.
TEST_WORKERS ?= 2
# pip installs without compiling bytecode (it compiled every file of Ray, torch and the rest: half of set-up); Python
# compiles what is imported, once, into the venv. That needs bytecode writing on, whatever the caller's environment.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(PIP_C) "$(TORCH)" -e ".[dev]"
	$(PY) -m pip list 2>/dev/null | grep -i "^torch "
	touch $@

run: setup
	$(VENV)/bin/dicl pipeline configs/demo.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile $(ARGS)

clean:
	rm -rf outputs .pytest_cache
