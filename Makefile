# Developer and CI entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
ARTIFACTS := test-artifacts
# Only the folders that exist (some come later).
LINT_DIRS := $(wildcard seqsal server_kit seqsal_cli saliency_server inference_server ui tests bench scripts)
PYTEST_ARGS ?=
BENCH_ARGS ?=
UP_ARGS ?=

# Nothing here may download models.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup proto lint format test test-fast up bench

help:
	@echo "make setup      create/update .venv (scripts/setup.sh; a no-op when nothing changed)"
	@echo "make proto      regenerate the gRPC stubs in seqsal/v1 from proto/"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make format     ruff format + ruff check --fix"
	@echo "make test       setup, stub check, lint, then the whole test suite (what CI runs)"
	@echo "make test-fast  the tests not marked slow"
	@echo "make up         run the whole stack on the default model (UP_ARGS=\"--backend transformers\" ...)"
	@echo "make bench      run the benchmarks"

setup:
	bash scripts/setup.sh

# Targets that only need some .venv run setup when there is none yet.
$(PY):
	bash scripts/setup.sh

proto: | $(PY)
	$(PY) -m seqsal.protogen

lint: | $(PY)
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)

format: | $(PY)
	$(PY) -m ruff format $(LINT_DIRS)
	$(PY) -m ruff check --fix $(LINT_DIRS)

# pytest exits 5 when it collected no test: that is a failure here (make stops on any non-zero).
define run_pytest
	@mkdir -p $(ARTIFACTS)
	$(PY) -m pytest -q --junitxml=$(ARTIFACTS)/$(1).xml $(2) $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing" >&2; fi; exit $$rc
endef

test: setup
	$(PY) -m seqsal.protogen --check
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)
	$(call run_pytest,junit,)

test-fast: setup
	$(call run_pytest,junit-fast,-m "not slow")

up: setup
	$(VENV)/bin/seqsal up $(UP_ARGS)

# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--sizes 128,512 --json out.json"
bench: setup
	$(PY) bench/bench_saliency.py $(BENCH_ARGS)
