"""The layering contracts of pyproject.toml ([tool.importlinter], run by ``make lint``) hold for ragseg,
and they bite: an upward import, a cycle between sibling modules, or the library importing test code
breaks them (checked on a copy of the package with one such import added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.fixture(scope="module")
def copy_of_package(tmp_path_factory):
    def make(module: str, line: str) -> Path:
        d = tmp_path_factory.mktemp("layers")
        shutil.copytree(ROOT / "ragseg", d / "ragseg", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", d / "pyproject.toml")
        path = d / (module.replace(".", "/") + ".py")
        path.write_text(path.read_text() + f"\n{line}\n")
        return d

    return make


@pytest.mark.parametrize("module, line, broken, names", [
    # the bottom layer importing the CLI
    ("ragseg.io", "from ragseg.jobs import cli  # noqa", "layers run down", "ragseg.io -> ragseg.jobs"),
    # a lazy upward import counts too: index is below stages
    ("ragseg.index.search", "def _f():\n    from ragseg.stages.embed import Embed  # noqa", "layers run down",
     "ragseg.index.search -> ragseg.stages.embed"),
    # a cycle inside one layer (weights <-> gdino)
    ("ragseg.models.weights", "def _g():\n    from ragseg.models import gdino  # noqa", "no import cycles", "gdino"),
    # the library importing test code
    ("ragseg.db", "def _h():\n    import conftest  # noqa", "imports no test or benchmark code", "conftest"),
])
def test_contracts_bite(copy_of_package, module, line, broken, names):
    r = _lint(copy_of_package(module, line))
    assert r.returncode != 0, r.stdout
    out = r.stdout
    assert broken in out.split("Broken contracts")[-1], out  # (an upward import may also close a cycle)
    assert names in out, out
