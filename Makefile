# ShopTalk — the README's commands. Everything installs into ./.venv with pip.
# torch is pinned (pyproject) to the CPU build kept on the project machines;
# GPU users: install your platform's torch into .venv first, then `make`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# llama-cpp-python compiles llama.cpp for this CPU (-march=native). Its AMX
# kernels crash on CPUs/VMs that report AMX without enabling it (seen on the
# project machines), so they are left out; set CMAKE_ARGS yourself to change
# the build (e.g. CMAKE_ARGS=-DGGML_CUDA=on).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)',)

.DEFAULT_GOAL := help
.PHONY: help demo test test-e2e lint format bench clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	CMAKE_ARGS="$${CMAKE_ARGS:-$(LLAMA_CMAKE_ARGS)}" $(PIP) install -e '.[train,serve,dev]'
	@touch $(STAMP)

demo: $(STAMP) ## Set up and run the main job on the default model (this repo's own history)
	$(VENV)/bin/shoptalk demo --repo .

test: $(STAMP) ## Set up and run the test suite (unit + end-to-end)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy sees the folders under their installed names through a symlink farm.
	@rm -rf build/typecheck && mkdir -p build/typecheck/shoptalk
	@for d in models server trainer; do ln -s ../../../$$d build/typecheck/shoptalk/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p shoptalk.models -p shoptalk.server -p shoptalk.trainer

format: $(STAMP) ## Apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## Run the benchmarks (long; figures go to docs/benchmarks.md by hand)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean: ## Remove the venv and build outputs (never your data dir)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
