# dogbreed: train, tune and serve a dog-breed classifier on SageMaker (BYOC) or locally.
SHELL := /bin/bash
PYTHON_SYSTEM ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
SAMPLE_DATA ?= ../shared/data/dogs-sample
PYTEST_ARGS ?=
# make test's pytest processes (pytest-xdist); each test file stays on one (its servers are shared).
# xdist hands out the files with most tests first, so the few long files mostly run beside short
# ones; long files first was slower (two of them side by side slow each other down).
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format audit demo bench-train bench-serve soak clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with the package and every dependency (idempotent)

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade --quiet "pip>=24"
	$(PYTHON) -m pip install --quiet -e '.[all,dev]'
	touch $@

test: install ## run the test suite (CPU; real MMS and Java; docker tests run in test-docker)
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install ## ruff over src, scripts and tests
	$(PYTHON) -m ruff check src scripts tests

audit: install ## pip-audit the installed dependencies (exit 0 clean, 1 advisories, 2 no database reachable)
	$(PYTHON) scripts/audit_deps.py

format: install ## ruff format + import sort
	$(PYTHON) -m ruff check --fix --select I src scripts tests
	$(PYTHON) -m ruff format src scripts tests

demo: install ## train ResNet18 + MobileNetV2 on the sample data, serve both locally, invoke by TargetModel
	$(VENV)/bin/dogbreed demo --data $(SAMPLE_DATA)

bench-train: install ## training throughput benchmark (JSON; --quick on CPU)
	$(PYTHON) scripts/bench_train.py $(if $(filter cuda,$(DEVICE)),,--quick)

bench-serve: install ## serving latency benchmark through real MMS (JSON)
	$(PYTHON) scripts/bench_serve.py

soak: install ## 11-minute soak of the local endpoint: hostile requests, unloads, worker kills (JSON)
	$(PYTHON) scripts/soak.py --out build/soak.json

clean: ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

-include docker/images.mk
