# Two commands for a fresh machine:  `make reproduce` (the main job)  and  `make test`.
# The virtual environment is made on first use. TORCH picks the torch build: here the CPU
# wheel on local disk; elsewhere e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.densepr-installed

.PHONY: install reproduce smoke test test-all bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,compare,tensorboard,serve,e2e]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded defaults: fetch, index, retrieve, evaluate, table + plot, regression check.
reproduce: $(STAMP)
	$(VENV)/bin/densepr reproduce --profile full --output runs/embedded

## The same on 300 questions per test set (what CI runs).
smoke: $(STAMP)
	$(VENV)/bin/densepr reproduce --profile smoke --output runs/smoke

## Lint, then unit and integration tests (tests needing the fetched data skip, saying why, until `densepr data fetch`).
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

## Also the slow tests.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf runs .pytest_cache
