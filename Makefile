# captionfleet — the three commands users type (see README.md and ../shared/CONTRACT.md).
#   make run    serve the bundled model on http://127.0.0.1:8080
#   make test   install what is missing, then lint, type-check, check the layers and run the suite
#   make bench  the side-by-side benchmarks
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build by default. For CUDA: make TORCH_SPEC='torch==2.13.0' TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: run test bench lint typecheck layers unit crd crds docs-config docs clean redis-server

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so that nothing below pulls a multi-GB CUDA build of it.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(BIN)/captionfleet serve --host 127.0.0.1 --port 8080

# Tests that use Redis start their own redis-server; it comes from Debian's package.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP) redis-server
	$(BIN)/pytest

test: lint typecheck layers unit

# Regenerate the derived install files: docs/configuration.md, the chart's RBAC rules and its CRDs.
docs: $(STAMP)
	$(BIN)/python -m captionfleet.docgen

bench: $(STAMP)
	$(BIN)/captionfleet bench $(BENCH_ARGS)

# Regenerate crds/ from the operator's pydantic spec models (a test fails when they are stale).
crds: $(STAMP)
	$(BIN)/python -m captionfleet.operator.crd crds

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
