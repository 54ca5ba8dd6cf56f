# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install dev lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned so that no CUDA build is ever pulled on a CPU machine.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'

dev: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'

demo: install
	$(BIN)/python -m lorajobs.demo

# mypy checks lorajobs/ and lora_core/ ([tool.mypy] in pyproject.toml); .mypy_cache keeps a
# re-run at seconds.
# The suite runs in TEST_WORKERS processes, a test file each at a time (`--dist loadfile`: a
# file's servers and fixtures stay in one process). Most tests wait on real subprocesses
# (servers, workers, trainers), so 3 processes keep 2 cores busy (954 tests in 9:35 from a fresh clone;
# `make test` in a built checkout 9:53 in all;
# quiet 2-core box, 2026-12-06; 4 processes were ~70 s faster on an earlier suite but showed more
# load-dependent failures); every test owns its ports,
# databases, Redis db number and directories. The longest files start first (tests/conftest.py,
# LONGEST_FIRST; --no-loadscope-reorder keeps that order). The 10 slowest are listed at the end.
TEST_WORKERS ?= 3
test: dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m tests.vllm_env  # vLLM's CPU venv for tests/serving: built once per machine
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
