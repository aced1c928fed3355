# Pie developer entry points. Heavy installs are cached outside the checkout (PIE_CACHE), keyed by version,
# so a fresh clone reuses them and a fresh machine builds them once.
SHELL := /bin/bash
PIE_CACHE ?= $(HOME)/.cache/pie
export PIE_CACHE
PYVER := $(shell python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
VENV := $(PIE_CACHE)/venv-py$(PYVER)-torch2.9.1
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-$(shell sha256sum pyproject.toml | cut -c1-16)
# The project runs from the checkout (see .ci/install-deps.py for why it is not installed).
export PYTHONPATH := $(CURDIR)/engine:$(CURDIR)/operator:$(CURDIR)
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: help venv k8s test test-unit test-e2e lint demo demo-down bench clean-cache

help:
	@echo "make demo       local control plane + operator + engine on a tiny model"
	@echo "make demo-down  stop everything the demo started"
	@echo "make test       unit tests, then end-to-end tests on a real local control plane"
	@echo "make lint       ruff, import-linter (package boundaries), mypy"
	@echo "make bench      benchmarks (JSON + PNG under bench/results)"

venv: $(DEPS_STAMP)
# NOTE: the stamp's name carries the hash of pyproject.toml, so no mtime prerequisite: a fresh clone (new mtimes)
# reuses the cached venv, and any change to pyproject.toml makes a new stamp name and reinstalls.
$(DEPS_STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) .ci/install-deps.py engine operator dev
	@rm -f $(VENV)/.deps-* && touch $@

k8s: venv
	$(PY) tests/cluster/build.py

test: venv k8s
	$(MAKE) lint
	$(MAKE) test-unit
	$(MAKE) test-e2e

test-unit: venv
	$(PYTEST) -m "not e2e" -q tests

test-e2e: venv k8s
	$(PYTEST) -m e2e -q tests

# ruff for style, import-linter for the package boundaries ([tool.importlinter]), mypy for types ([tool.mypy]).
lint: venv
	$(PY) -m ruff check engine operator tests bench docs
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

demo: venv k8s
	$(PY) -m tests.cluster.demo up

demo-down: venv
	$(PY) -m tests.cluster.demo down

bench: venv
	$(PY) bench/run_all.py
