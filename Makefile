# ragseg: two commands matter: `make setup` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/ragseg demo --config configs/demo.yaml

# The index benchmark at N = 1M x 768 takes hours on 2 CPUs: `make bench BENCH_INDEX_ARGS=` runs
# bench/index.py's defaults (100k and 1M); the default here is the 100k run.
BENCH_INDEX_ARGS ?= --sizes 100000 --nlist-per-sqrt-n 2 --opq off

# bench/scale.py (the commit path at 30k pieces, local and moto S3; driver CPU; driver RSS labelling
# 10k and 100k generated images): about 12 minutes on 2 shared CPUs
BENCH_SCALE_ARGS ?=

bench: setup
	$(BIN)/python bench/stages.py
	$(BIN)/python bench/index.py $(BENCH_INDEX_ARGS)
	$(BIN)/python bench/build_db.py
	$(BIN)/python bench/scale.py $(BENCH_SCALE_ARGS)

lint: setup
	$(BIN)/ruff check ragseg tests bench

clean:
	rm -rf demo_out .pytest_cache
