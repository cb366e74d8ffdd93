"""The install: exactly one FAISS build, `make setup` CPU-safe and `make setup GPU=1` GPU-only, and the
index code choosing GPU or CPU paths from faiss.get_num_gpus() without touching GPU-only symbols."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = ("StandardGpuResources", "index_cpu_to_all_gpus", "index_cpu_to_gpu", "index_cpu_to_gpus_list",
            "index_cpu_to_gpu_multiple_py", "GpuParameterSpace", "GpuClonerOptions", "GpuMultipleClonerOptions",
            "index_gpu_to_cpu")


def _faiss_pins(reqs: list[str]) -> list[str]:
    return [r for r in reqs if re.match(r"faiss", r)]


def test_pyproject_one_faiss_per_extra():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _faiss_pins(proj["dependencies"]) == []  # the base never pins a FAISS build
    extras = proj["optional-dependencies"]
    cpu, gpu = _faiss_pins(extras["cpu"]), _faiss_pins(extras["gpu"])
    assert len(cpu) == 1 and cpu[0].startswith("faiss-cpu==")
    assert len(gpu) == 1 and gpu[0].startswith("faiss-gpu==")
    assert cpu[0].split("==")[1] == gpu[0].split("==")[1]  # the same FAISS version either way
    assert _faiss_pins(extras["dev"]) == []


def test_venv_has_exactly_one_faiss_build_and_it_imports():
    from ragseg.envinfo import FAISS_DISTS

    installed = {d: v for d in FAISS_DISTS if (v := _dist_version(d))}
    assert len(installed) == 1, installed
    import faiss

    (dist, version), = installed.items()
    assert faiss.__version__ == version.split(".post")[0]
    assert hasattr(faiss, "StandardGpuResources") == (dist != "faiss-cpu")
    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32))
    assert index.search(np.eye(8, dtype=np.float32)[:2], 1)[1].ravel().tolist() == [0, 1]


def _dist_version(d: str) -> str | None:
    try:
        return metadata.version(d)
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("gpu,extra,removed", [("", "cpu", "faiss-gpu"), ("1", "gpu", "faiss-cpu")])
def test_make_setup_installs_one_build(tmp_path, gpu, extra, removed):
    """`make -n` (print only): the other build is uninstalled first, then `.[dev,<build>]`."""
    res = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path}/v", f"GPU={gpu}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    uninstall = next(i for i, x in enumerate(lines) if "pip uninstall" in x)
    install = next(i for i, x in enumerate(lines) if "pip install -q -e" in x)
    assert uninstall < install and removed in lines[uninstall].split()
    assert f"'.[dev,{extra}]'" in lines[install]
    assert "import faiss" in lines[install + 1]


@pytest.fixture
def gpu_only_forbidden(monkeypatch):
    """Every GPU-only faiss symbol replaced by a recorder that fails: touching one is seen."""
    import faiss

    calls: list[str] = []

    def forbid(name):
        def f(*a, **k):
            calls.append(name)
            raise RuntimeError(f"GPU-only faiss.{name} used")
        return f

    for name in GPU_ONLY:
        monkeypatch.setattr(faiss, name, forbid(name), raising=False)
    return calls


@pytest.mark.parametrize("num_gpus", [0, 1])
def test_index_paths_follow_get_num_gpus(monkeypatch, gpu_only_forbidden, num_gpus):
    import faiss

    from ragseg.config import IndexConfig
    from ragseg.index.faiss_util import train as _train
    from ragseg.index.faiss_util import use_gpu_for
    from ragseg.index.params import choose_params

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: num_gpus)
    rs = np.random.RandomState(0)
    x = rs.randn(3000, 32).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    params = choose_params(len(x), 32, IndexConfig(nlist_per_sqrt_n=1))
    assert use_gpu_for("auto") == (num_gpus > 0) and use_gpu_for("off") is False
    index, gpu = _train(params, 32, x, use_gpu_for("auto"))
    assert index.is_trained and gpu is False
    if num_gpus == 0:
        assert gpu_only_forbidden == []  # no GPU: no GPU-only symbol was touched
    else:
        assert gpu_only_forbidden == ["index_cpu_to_all_gpus"]  # chosen, failed, fell back to the CPU


# ----------------------------------------------------------------------------------------------
# bench/gpu_smoke.py
# ----------------------------------------------------------------------------------------------
def _smoke(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_smoke_without_gpu_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the smoke test would run")
    res = _smoke([], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("\n") == 1 and res.stdout.startswith("gpu_smoke: no CUDA GPU visible")


def test_gpu_smoke_cpu_check_stages(tmp_path):
    """The smoke script's stage code on the CPU at tiny sizes: bf16 vs fp32 checks and images/s."""
    out = tmp_path / "smoke.json"
    res = _smoke(["--cpu-check", "--skip", "faiss,pipeline", "--batch-sizes", "1,2", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["failed_checks"] == [] and doc["mode"] == "cpu-check"
    st = doc["stages"]
    stages = ("embed-pool", "segment", "segment-sam2", "detect")
    assert set(st["bf16_vs_fp32"]) == set(stages)
    assert all(v["ok"] for v in st["bf16_vs_fp32"].values())
    assert {(r["stage"], r["batch_size"]) for r in st["results"]} == {(s, b) for s in stages for b in (1, 2)}
    # the SAM stages: both families, batched encoder vs one image per pass compared
    assert st["bf16_vs_fp32"]["segment"]["family"] == "sam" and st["bf16_vs_fp32"]["segment-sam2"]["family"] == "sam2"
    assert all(st["bf16_vs_fp32"][s]["sam_batched_rel_err"] <= 1e-4 for s in ("segment", "segment-sam2"))
    assert st["fcclip"].startswith("skipped")
