# ShopTalk — the README's commands. Everything installs into ./.venv with pip.
# torch is pinned (pyproject) to the CPU build kept on the project machines;
# GPU users: install your platform's torch into .venv first, then `make`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
VSCODE := editor-clients/vscode
# llama-cpp-python compiles llama.cpp for this CPU (-march=native). Its AMX
# kernels crash on CPUs/VMs that report AMX without enabling it (seen on the
# project machines), so they are left out; set CMAKE_ARGS yourself to change
# the build (e.g. CMAKE_ARGS=-DGGML_CUDA=on).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)',)

.DEFAULT_GOAL := help
.PHONY: help demo test test-e2e lint format bench clean editor-deps vsix

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	CMAKE_ARGS="$${CMAKE_ARGS:-$(LLAMA_CMAKE_ARGS)}" $(PIP) install -e '.[train,serve,dev]'
	@touch $(STAMP)

demo: $(STAMP) ## Set up and run the main job on the default model (this repo's own history)
	$(VENV)/bin/shoptalk demo --repo .

test: $(STAMP) editor-deps ## Set up and run the test suite (unit + end-to-end)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) $(VSCODE)/node_modules/.package-lock.json ## ruff (lint + format check), mypy, tsc + eslint
	cd $(VSCODE) && npx tsc --noEmit -p . && npx eslint --max-warnings 0 src
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

# Editor clients: the VS Code extension's node packages (from its lockfile),
# and for the real-editor tests code-server (e2e/install-code-server.sh says
# why not `npm install -g`) and Debian's Chromium (+ libkrb5-dev to build
# code-server's kerberos module, ripgrep for its file search). Needs Node 20.
EDITOR_APT := chromium libkrb5-dev ripgrep

$(VSCODE)/node_modules/.package-lock.json: $(VSCODE)/package-lock.json
	cd $(VSCODE) && npm ci --no-audit --no-fund

editor-deps: $(VSCODE)/node_modules/.package-lock.json ## Node packages, code-server, Chromium for the editor tests
	@missing=$$(for p in $(EDITOR_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "install these Debian packages first: sudo apt-get install $$missing"; exit 1; fi; \
	fi
	sh $(VSCODE)/e2e/install-code-server.sh build/code-server

vsix: $(VSCODE)/node_modules/.package-lock.json ## Build the VS Code extension: editor-clients/vscode/shoptalk.vsix
	cd $(VSCODE) && npm run compile && npm run lint && npm run package

clean: ## Remove the venv and build outputs (never your data dir)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
