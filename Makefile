# returnt-zoo: every target installs what it needs first (idempotent, quick when done).
# The environment lives in .venv (override with VENV=...); PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKBONE ?= resnet
ARGS ?=
# Required backbone arguments stay required in the registry (resnet's depth, as the seed shows);
# `make export` fills those not given in ARGS with the registry's examples (--example-args:
# resnet -> --depth 18, i.e. ResNet-18). Override: make export BACKBONE=resnet ARGS="--depth 50"
OUT ?= artifacts
PYTEST_ARGS ?=

AOTI_BATCH ?= dynamic
AOTI_WEIGHTS ?= replaceable
DIRS ?= $(OUT)/$(BACKBONE)
PORT ?= 8000
MODEL ?= $(BACKBONE)
REQUESTS ?= 2000
CONCURRENCY ?= 32
REPO ?= triton-repo

.PHONY: install test lint export export-aoti export-all bench zoo-table serve loadtest triton clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench,serve,sign,timm,edge]'
	@# the `python -m zoo list` table, cached (keyed by the sources): the first listing is instant too
	$(PY) -m zoo list > /dev/null
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with test extras

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff and the import-linter contracts (layers, formats, registry; pyproject.toml); CI runs it
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-logo

export: $(STAMP)  ## export one backbone: make export BACKBONE=resnet [ARGS="--depth 34"]
	$(PY) -m export $(BACKBONE) --example-args --out $(OUT) $(ARGS)

export-aoti: $(STAMP)  ## export with AOTInductor packages too: make export-aoti BACKBONE=resnet [AOTI_BATCH=dynamic,1] [AOTI_WEIGHTS=frozen]
	$(PY) -m export $(BACKBONE) --example-args --out $(OUT) --formats torchscript,onnx,exported,aoti \
		--aoti-batch $(AOTI_BATCH) --aoti-weights $(AOTI_WEIGHTS) $(ARGS)

export-all: $(STAMP)  ## export every registered backbone
	$(PY) -m export --all --out $(OUT) $(ARGS)

bench: $(STAMP)  ## every engine x precision, timed: $(OUT)/bench.json, bench.png; DIR=artifacts/resnet: that export's fastest engine, saved for load(DIR)
	@mkdir -p $(OUT)
ifdef DIR
	$(PY) -m export bench $(DIR) --save --json $(OUT)/bench-dir.json $(ARGS)
else
	$(PY) -m export bench --json $(OUT)/bench.json --plot $(OUT)/bench.png $(ARGS)
endif

zoo-table: $(STAMP)  ## measure every backbone (~30 min) into docs/zoo.md and docs/zoo.csv: make zoo-table [ARGS="--names 'timm-*'"]
	$(PY) -m export zoo-table $(ARGS)

serve: $(STAMP)  ## serve export directories on Ray Serve (Open Inference Protocol): make serve DIRS=artifacts/resnet [ARGS="--replicas 2"]
	$(PY) -m export serve $(DIRS) --port $(PORT) $(ARGS)

loadtest: $(STAMP)  ## a bounded load on a running server: make loadtest MODEL=resnet [REQUESTS=2000 CONCURRENCY=32]
	@mkdir -p $(OUT)
	$(PY) -m export loadtest http://127.0.0.1:$(PORT) --model $(MODEL) --requests $(REQUESTS) \
		--concurrency $(CONCURRENCY) --json $(OUT)/loadtest.json $(ARGS)

triton: $(STAMP)  ## Triton model repository from export directories: make triton DIRS=artifacts/resnet [REPO=triton-repo]
	$(PY) -m export triton $(DIRS) --repo $(REPO) $(ARGS)

clean:  ## remove artifacts and caches (keeps .venv)
	rm -rf $(OUT) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
