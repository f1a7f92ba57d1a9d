# Two commands on a fresh machine with only Python:
#   make train   creates .venv, installs the project with torch 2.13.0, trains configs/quickstart.yaml on 2 ranks
#   make test    the same set-up, then the test suite
# TORCH_SPEC pins the torch build for dev/CI. On machines where PyPI's torch is a CUDA build and you
# want the CPU one, add its index: make train TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,deepspeed,hf
NPROC ?= 2
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=
# Test files run side by side on this many pytest-xdist workers (each file on one worker: its
# module fixtures run once, and the SLURM tests never share the one-node cluster). 3 on a 2-core
# machine: with 2, both cores idled 13 % of the time while tests waited on timeouts, signals and the
# SLURM scheduler; a third worker trains meanwhile. Raise it where there are more cores.
TEST_WORKERS ?= 3
BIN := $(VENV)/bin

.PHONY: setup train test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

train: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc_per_node=$(NPROC) --master_addr=127.0.0.1 --master_port=29511 \
		-m dist_train --config $(CONFIG)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 $(PYTEST_ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
