# Two set-up commands for a new user: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Torch pin for this machine lives in constraints.txt; GPU users: `make CONSTRAINTS= demo`
# after installing their own CUDA torch into .venv (see README).
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-cluster test-learning lint bench clean

venv: $(STAMP)

# uv installs what pip would (the same versions here), several packages at once: 36 s from an
# empty uv cache against pip's 2.3-4.5 min on 2 cores. pip stays the fallback where uv cannot install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -q $(PIP_C) -e '.[test,dev]' \
	  || { echo "uv could not install (above); installing with pip"; \
	       $(BIN)/python -m pip install -q $(PIP_C) -e '.[test,dev]'; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mplug demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "unit or integration or e2e" --durations=15 $(PYTEST_ARGS)

# Not part of `make test` while it is over its 20-min budget: Ray's real autoscaler over its fake
# multi-node provider (~6-7 min; both tests passed on 2026-12-07).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster tests/cluster --durations=0 $(PYTEST_ARGS)

# Not part of `make test`: the learning margins need ~50 min of finetuning on 2 cores.
test-learning: $(STAMP)
	$(BIN)/python -m pytest -m learning tests/learning --durations=0 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mplug pipelines jobs tests benchmarks
	$(BIN)/ruff format --check mplug pipelines jobs tests benchmarks

bench: $(STAMP)
	@echo "Each benchmark is a script under benchmarks/; see benchmarks/README.md"

clean:
	rm -rf $(VENV) demo_out .pytest_cache
