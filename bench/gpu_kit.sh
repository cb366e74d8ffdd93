#!/usr/bin/env bash
# The Python wheels a lent GPU machine lacks for bench/gpu_smoke.py. Its image has Python 3.12 with
# torch (CUDA 13), transformers, timm, pyarrow, numpy, typer, rich, fsspec, pyyaml, but no open_clip,
# segment_anything, pycocotools, pydantic or faiss, and it cannot reach PyPI: the wheels travel in .whl/
# (git-ignored, at most 64 MiB with the tree). Two things cannot travel within that limit: faiss-gpu
# (a 135 MB wheel, plus the CUDA 12 cuBLAS it needs) and ray (79 MB). So on such a machine the smoke test
# runs the stages with faiss-cpu and skips the Ray pipeline; a GPU machine with internet runs
# `make setup GPU=1 && .venv/bin/python bench/gpu_smoke.py` instead, which covers everything.
#
#   bash bench/gpu_kit.sh download     # here (PyPI reachable): cp312 wheels into .whl/
#   then one device call, carry [".whl"]:
#   bash bench/gpu_kit.sh install && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 bench/gpu_smoke.py --skip pipeline --out $OUT/gpu_smoke.json
set -euo pipefail
WHL=${WHL:-.whl}
WHEELS=(faiss-cpu==1.15.1 open_clip_torch==3.3.0 segment-anything==1.0 pycocotools==2.0.11 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types typing-inspection "typing-extensions>=4.16" ftfy wcwidth
        hydra-core==1.3.8 omegaconf==2.3.1 iopath==0.1.10 portalocker)
case "${1:-download}" in
  download)
    case "$WHL" in  # a folder inside the repo must be git-ignored (device README: .git/info/exclude)
      /*) ;;
      *) git check-ignore -q "$WHL" 2>/dev/null || echo "/$WHL/" >> "$(git rev-parse --git-common-dir)/info/exclude" ;;
    esac
    mkdir -p "$WHL"
    for w in "${WHEELS[@]}"; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHL" "$w"
    done
    # sdists only: antlr4-python3-runtime 4.9.3 (hydra's pin) and sam2 (SAM 2.1, whose build imports torch):
    # pure wheels built here with the project's venv
    "${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps -w "$WHL" antlr4-python3-runtime==4.9.3
    SAM2_BUILD_CUDA=0 "${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" sam2==1.1.0
    du -sh "$WHL" ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl ;;
  *) echo "usage: $0 download|install" >&2; exit 2 ;;
esac
