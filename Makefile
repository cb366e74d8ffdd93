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

# Index benchmark: three data settings at N = 100k (~10 min on 2 CPUs); 1M:
# `make bench BENCH_INDEX_ARGS="--n 1000000 --settings medium:1000:1.0"`.
BENCH_INDEX_ARGS ?= --n 100000

bench: setup
	$(BIN)/python bench/stages.py
	$(BIN)/python bench/index.py $(BENCH_INDEX_ARGS)
	$(BIN)/python bench/build_db.py

lint: setup
	$(BIN)/ruff check ragseg tests bench

clean:
	rm -rf demo_out .pytest_cache
