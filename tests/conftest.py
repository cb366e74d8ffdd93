"""Shared fixtures: a capped local Ray, the tiny config, deterministic seeds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from ragseg.testing.s3 import moto_s3_env, start_moto  # noqa: F401 - fixtures below and tests use them

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "test-tiny.yaml")

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray resolves 127.0.0.1 to this machine's outward address (ray._private.services.resolve_ip_for_localhost)
# unless it is told the machine is a single-node setup: keep every test's Ray traffic on loopback
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_cfg_path() -> str:
    return TINY


@pytest.fixture
def tiny_cfg():
    from ragseg.config import load_config

    return load_config(TINY)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, capped to this small machine."""
    import ray

    if not ray.is_initialized():
        # address="local": a new instance even if another `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, _node_ip_address="127.0.0.1")
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def build_world(tmp_path_factory, tiny_cfg_path: str, name: str, images: int, seed: int,
                overrides: tuple[str, ...] = ()) -> dict:
    """A synthetic set of its own, a gt-mask DB of its train split and an index over it (for label
    tests that need more keys per class than the session set has); ``overrides`` apply to the DB build."""
    from ragseg.config import load_config
    from ragseg.index.build import build_index
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.sources.synthetic import make_synthetic

    root = tmp_path_factory.mktemp(name)
    syn = make_synthetic(str(root / "data"), images=images, seed=seed, size=96, val_fraction=0.25)
    db, index = str(root / "db"), str(root / "index")
    base = [f"source.uri={root / 'data'}", "source.kind=synthetic", "source.split=train"]
    run_build_db(load_config(tiny_cfg_path, base + [f"build_db.out={db}", "build_db.masks=gt", *overrides]))
    build_index(db, load_config(tiny_cfg_path, [f"index.out={index}", "index.min_recall_at_10=0"]))
    return {"syn": syn, "data": str(root / "data"), "db": db, "index": index, "root": root}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A small synthetic panoptic set (all three layouts), made once per session."""
    from ragseg.sources.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(out), images=24, seed=0, size=96, val_fraction=0.25)
    return str(out)


@pytest.fixture
def kill_after_first_shard():
    return run_and_kill_after_first_shard


def committed_pieces(out: str) -> int:
    """Pieces committed in a local output folder (commit objects + compacted segments)."""
    import pyarrow.parquet as pq

    n = 0
    commits = os.path.join(out, "_commits")
    if os.path.isdir(commits):
        n += sum(1 for f in os.listdir(commits) if f.endswith(".json") and not f.startswith(".tmp-"))
    try:
        import json

        with open(os.path.join(out, "manifest.json")) as f:
            segs = json.load(f).get("segments", [])
        n += sum(pq.read_metadata(os.path.join(out, s)).num_rows for s in segs)
    except (FileNotFoundError, ValueError, OSError):
        pass
    return n


def run_and_kill_after_first_shard(args: list[str], out: str, timeout: float = 240.0) -> int:
    """Start ``python -c SCRIPT args`` in its own process group and SIGKILL the whole group as soon as
    the output folder ``out`` has a committed piece; returns how many it had. Fails if it finished first."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    done = 0
    while time.time() < deadline and proc.poll() is None:
        done = committed_pieces(out)
        if done:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert done, "the job finished (or failed) before it could be killed"
    return done


@pytest.fixture(scope="session")
def moto_starter():
    """:func:`start_moto`, for tests that need a server of their own (other credentials, a clean bucket set)."""
    return start_moto


@pytest.fixture(scope="session")
def s3_server():
    """:func:`moto_s3_env` for the whole session."""
    with moto_s3_env() as env:
        yield env


def run_cli_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``ragseg ARGV`` in this process (its real ``main``: one-line errors, exit codes); returns
    (exit code, stdout, stderr)."""
    import sys

    from ragseg.jobs import cli

    old = sys.argv
    sys.argv = ["ragseg", *argv]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def only_named_objects(kind: str, out: str) -> None:
    """Every object under ``out`` is named: the header, the segments it lists, the files of the
    committed records, the PNGs of the labelled images and panoptic.json; no orphan segment, no commit
    object left (the run compacted all of its records), no temporary file."""
    from ragseg import io, ledger

    led = ledger.load(out, kind)
    fs, root = io.fs_and_path(out)
    root = root.rstrip("/")
    fs.invalidate_cache()
    have = sorted(p[len(root) + 1:] for p in fs.find(root))
    named = {ledger.MANIFEST, *led.header["segments"]}
    for r in led.records.to_pylist():
        named |= {p for p in (r["data_path"], r["errors_path"], r["parts_path"]) if p}
    if kind == "labels":
        from ragseg.labels_out import PANOPTIC_JSON, iter_images

        named |= {PANOPTIC_JSON} | {f"panoptic/{a['png_name']}" for a in iter_images(out)}
    assert have == sorted(named), f"unnamed objects: {sorted(set(have) - named)}; missing: {sorted(named - set(have))}"


@pytest.fixture(scope="session", autouse=True)
def repo_root_stays_clean():
    """No test writes into the repository root: the jobs' default output folders (``./db``,
    ``./index``, ``./labels``) must not appear there during the session."""
    root = Path(__file__).resolve().parents[1]
    watched = ("db", "index", "labels", "demo_out")
    before = {n for n in watched if (root / n).exists()}
    yield
    new = sorted(n for n in watched if (root / n).exists() and n not in before)
    assert not new, f"tests wrote into the repository root: {new} (give the job an --out under tmp_path)"


def commit_path_cfg(kind: str, images: str, out: str, vocab: str):
    """The commit-path tests' config: build-db (``kind`` "db") or label over the folder ``images`` into
    ``out``, 2 images a piece, compaction every 2 commits."""
    from ragseg.config import load_config

    common = ["commit.compact_every=2", "ray.progress=false"]
    if kind == "db":
        return load_config(None, common + ["source.kind=folder", f"source.uri={images}", f"build_db.out={out}",
                                           "build_db.images_per_shard=2"])
    return load_config(None, common + ["label.images.kind=folder", f"label.images.uri={images}",
                                       f"label.vocab={vocab}", f"label.out={out}", "label.images_per_shard=2",
                                       "label.panoptic_json=always"])
