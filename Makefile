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
LINKS := $(VENV)/.linked
FILE_LIST := $(VENV)/.package-files

.PHONY: run test bench lint typecheck layers unit crd crds docs-config docs clean redis-server promtool FORCE

# The dependencies, once (and again when pyproject.toml changes).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=69'
	# torch first, so that nothing below pulls a multi-GB CUDA build of it.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	@touch $@

# The package itself: a strict editable install, i.e. setuptools links every file of the package into
# build/__editable__.*/captionfleet/ by its import name (operator/ -> captionfleet/operator/), which
# mypy and import-linter can read. Edits show at once; a file added or removed needs a new link tree,
# so this reruns whenever the list of package files changes (or the link tree is gone).
$(FILE_LIST): FORCE
	@mkdir -p $(VENV)
	@find captionfleet operator runtime -type f -not -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@if cmp -s $@.new $@ && ls -d build/__editable__.captionfleet-* >/dev/null 2>&1; then rm $@.new; else mv $@.new $@; fi

$(LINKS): $(STAMP) $(FILE_LIST)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	@touch $@

run: $(LINKS)
	$(BIN)/captionfleet serve --host 127.0.0.1 --port 8080

# Tests that use Redis start their own redis-server; it comes from Debian's package.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# The chart's alert rules are checked and unit-tested by Prometheus' own promtool (tests/deploy), and one
# e2e rollout reads a real Prometheus server (tests/e2e); both come from Debian's prometheus package.
promtool:
	@{ command -v promtool && command -v prometheus; } >/dev/null || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

lint: $(LINKS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy reads the installed package (the link tree), then names the source files in what it prints.
typecheck: $(LINKS)
	@tree=$$(ls -d build/__editable__.captionfleet-*); set -o pipefail; \
	MYPYPATH=$$tree $(BIN)/mypy $$tree/captionfleet | sed -E \
	  -e "s#^$$tree/captionfleet/(operator|runtime)/#\1/#" -e "s#^$$tree/##"

layers: $(LINKS)
	$(BIN)/lint-imports

unit: $(LINKS) redis-server promtool
	$(BIN)/pytest

test: lint typecheck layers unit

# Regenerate the derived install files: docs/configuration.md, the chart's RBAC rules and its CRDs.
docs: $(LINKS)
	$(BIN)/python -m captionfleet.docgen

bench: $(LINKS)
	$(BIN)/captionfleet bench $(BENCH_ARGS)

# Regenerate crds/ from the operator's pydantic spec models (a test fails when they are stale).
crds: $(LINKS)
	$(BIN)/python -m captionfleet.operator.crd crds

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
