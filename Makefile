# ragseg: two commands matter: `make setup` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# FAISS build: `make setup` installs faiss-cpu; `make setup GPU=1` installs faiss-gpu instead (the
# other build is uninstalled first: the two wheels write the same `faiss` package).
GPU ?=
FAISS := $(if $(filter 1 yes true,$(GPU)),gpu,cpu)
FAISS_OTHERS := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu faiss-gpu-cu11 faiss-gpu-cu12 faiss-gpu-cuvs faiss-gpu-cu12-cuvs faiss-gpu-cu13-cuvs)
FAISS_MARK := $(VENV)/.faiss-$(FAISS)
# SAM 2.1 (models.sam.family: sam2): an sdist built against the installed torch (see pyproject.toml)
SAM2 := sam2==1.1.0

.PHONY: setup test demo bench lint clean experiments

setup: $(STAMP)

$(STAMP): pyproject.toml $(FAISS_MARK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip uninstall -q -y $(FAISS_OTHERS) 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[dev,$(FAISS)]'
	$(BIN)/python -c "import faiss; print('faiss', faiss.__version__, 'GPU build' if hasattr(faiss, 'StandardGpuResources') else 'CPU build')"
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-deps --no-build-isolation $(SAM2)
	rm -f $(VENV)/.faiss-cpu $(VENV)/.faiss-gpu
	touch $(FAISS_MARK) $(STAMP)

# a missing mark (first setup, or the other FAISS build asked for) makes the stamp stale
$(VENV)/.faiss-%: ;

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/ragseg demo --config configs/demo.yaml

# Index benchmark: three data settings at N = 100k (~10 min on 2 CPUs); 1M:
# `make bench BENCH_INDEX_ARGS="--n 1000000 --settings medium:1000:1.0"`.
BENCH_INDEX_ARGS ?= --n 100000
# the sharded build vs the same index built in one process, at 1M vectors (medium setting; the
# generated DB is kept in bench/.cache/ for the next run): about 45 min on 2 free CPUs
BENCH_INDEX_SINGLE_ARGS ?= --n 1000000 --settings medium:1000:1.0 --compare-single --nprobes 1,2,4,8,16 \
	--search-cost off --db-cache bench/.cache/index-1m

# bench/scale.py: the commit path at 30k pieces (local, moto S3); driver CPU on the jobs' real graphs;
# label driver RSS at 10k / 100k images (panoptic_json auto); the panoptic JSON to 1M images; resume
# start-up on 200k S3 objects; 1000 runs of history: a few hours on 2 shared CPUs
BENCH_SCALE_ARGS ?=

bench: setup
	$(BIN)/python bench/stages.py
	$(BIN)/python bench/stages.py --flops
	$(BIN)/python bench/index.py $(BENCH_INDEX_ARGS)
	$(BIN)/python bench/index.py $(BENCH_INDEX_SINGLE_ARGS)
	$(BIN)/python bench/build_db.py
	$(BIN)/python bench/scale.py $(BENCH_SCALE_ARGS)

# the paper's five experiments on the embedded synthetic world with the tiny random-weight models
# (README "Experiments"): results, tables and plots under experiments_out/, the cache in experiments_cache/
experiments: setup
	$(BIN)/ragseg experiment all --config configs/experiments.yaml --out experiments_out

lint: setup
	$(BIN)/ruff check ragseg tests bench
	$(BIN)/lint-imports

clean:
	rm -rf demo_out .pytest_cache experiments_out experiments_cache
