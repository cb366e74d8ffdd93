"""`ragseg env`: the bug-report facts, without starting a cluster when none is configured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def test_env_cli_no_cluster(tmp_path):
    env = {"PATH": str(BIN) + ":/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAGSEG_CACHE": str(tmp_path / "c"),
           "HOME": str(tmp_path)}
    res = subprocess.run([str(BIN / "ragseg"), "env", "--json"], env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    import faiss
    import torch

    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    assert info["torch"]["cuda_build"] == torch.version.cuda
    assert info["faiss"]["version"] == faiss.__version__
    assert info["faiss"]["build"] in ("CPU", "GPU") and "problem" not in info["faiss"]
    assert len(info["faiss"]["wheels"]) == 1
    assert info["ray"]["address"] is None and info["ray"]["cluster"].startswith("no cluster")
    assert info["cache_dir"] == str(tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written, nothing started

    text = subprocess.run([str(BIN / "ragseg"), "env"], env=env, capture_output=True, text=True, timeout=180)
    assert text.returncode == 0 and "faiss:" in text.stdout and "no cluster" in text.stdout


def test_env_reports_running_ray(ray_local):
    from ragseg.envinfo import collect, format_text

    info = collect(None)
    assert info["ray"]["cluster"]["resources"]["CPU"] == 2
    assert "CPU: 2" in format_text(info)
