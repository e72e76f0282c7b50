# Two commands for a fresh machine:  `make reproduce` (the main job)  and  `make test`.
# The virtual environment is made on first use. TORCH picks the torch build: here the CPU
# wheel on local disk; elsewhere e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.densepr-installed

.PHONY: install reproduce reproduce-dpr smoke smoke-dpr test test-all bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,compare,tensorboard,serve,e2e,ray,onnx,fast,interop]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded defaults: fetch, index, retrieve, evaluate, table + plot, regression check.
reproduce: $(STAMP)
	$(VENV)/bin/densepr reproduce --profile full --output runs/embedded

## The paper's experiment: mine, train DPR (in-batch only; + BM25 hard negatives), re-mine with the
## trained model, train round 2, evaluate everything on the five test sets (95-100 min and a 13.7 GiB peak measured in two runs on 2 CPU cores, 2026-12-05; docs/training.md).
reproduce-dpr: $(STAMP)
	$(VENV)/bin/densepr reproduce --profile dpr --output runs/dpr

## The same on 300 questions per test set (what CI runs).
smoke: $(STAMP)
	$(VENV)/bin/densepr reproduce --profile smoke --output runs/smoke

## The paper's experiment in minutes: 2,000 passages, 600 questions per mining set, 4 steps per model (CI).
smoke-dpr: $(STAMP)
	$(VENV)/bin/densepr reproduce --profile dpr-smoke --output runs/dpr-smoke

## Lint, then unit and integration tests (tests needing the fetched data skip, saying why, until `densepr data fetch`).
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

## Also the slow tests.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/retrieval/speed.py

clean:
	rm -rf runs .pytest_cache
