"""Real S3 protocol: moto's S3 server on 127.0.0.1, s3fs as the client, the `ragseg` CLI as the user.

Images are read from s3:// and the DB is written to s3://; the CLI runs in a subprocess with its own
local Ray (workers inherit AWS_ENDPOINT_URL from it, as they would from a cluster's environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def s3_env(s3_server):
    return s3_server


def test_build_db_from_and_to_s3(s3_env, synthetic_root, tiny_cfg_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("ragseg-test")
    fs.put(synthetic_root.rstrip("/") + "/", "ragseg-test/syn/", recursive=True)
    assert fs.glob("ragseg-test/syn/**/*.jpg")

    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "ragseg"), "build-db", "--config", tiny_cfg_path,
           "--set", "source.kind=synthetic", "--set", "source.uri=s3://ragseg-test/syn",
           "--set", "source.split=val", "--set", "source.limit=4", "--set", "build_db.images_per_shard=2",
           "--set", "ray.num_cpus=1", "--out", "s3://ragseg-test/db"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["images"] == 4 and summary["errors"] == 0 and summary["segments"] > 0

    fs.invalidate_cache()
    import pyarrow.parquet as pq

    from ragseg.db import open_db

    led = open_db("s3://ragseg-test/db")
    pieces = led.records.to_pylist()
    assert len(pieces) == 2 and sum(p["images"] for p in pieces) == 4
    assert not led.uncompacted  # the end of the run compacted every commit record into the manifest
    rows = sum(pq.read_table(f"ragseg-test/db/{p['data_path']}", filesystem=fs).num_rows for p in pieces)
    assert rows == summary["segments"]
    assert not fs.exists("ragseg-test/db/_lease.json")  # released
    # no temporary litter left in the bucket
    assert not [p for p in fs.find("ragseg-test/db") if ".tmp-" in p]


def test_index_and_label_from_and_to_s3(s3_env, tiny_cfg_path):
    """Continues from the DB above: build-index into s3://, label s3:// images into s3://, eval from s3://."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    if not fs.exists("ragseg-test/db/manifest.json"):
        pytest.skip("needs the DB of test_build_db_from_and_to_s3")
    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(BIN / "ragseg"), "build-index", "--db", "s3://ragseg-test/db",
                          "--out", "s3://ragseg-test/index", "--config", tiny_cfg_path,
                          "--set", "index.min_recall_at_10=0", "--set", "ray.num_cpus=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fs.invalidate_cache()
    current = fs.cat("ragseg-test/index/CURRENT").decode().strip()
    assert fs.exists(f"ragseg-test/index/{current}/meta.json")

    res = subprocess.run([str(BIN / "ragseg"), "label", "--config", tiny_cfg_path,
                          "--set", "label.images.kind=synthetic", "--set", "label.images.uri=s3://ragseg-test/syn",
                          "--set", "label.images.split=val", "--set", "label.images.limit=3",
                          "--vocab", "s3://ragseg-test/syn/categories.json", "--index", "s3://ragseg-test/index",
                          "--out", "s3://ragseg-test/labels", "--proposals", "gt", "--set", "ray.num_cpus=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["images"] == 3 and summary["errors"] == 0
    fs.invalidate_cache()
    doc = json.loads(fs.cat("ragseg-test/labels/panoptic.json"))
    assert len(doc["annotations"]) == 3
    for a in doc["annotations"]:
        assert fs.exists(f"ragseg-test/labels/panoptic/{a['file_name']}")
    assert not [p for p in fs.find("ragseg-test/labels") if ".tmp-" in p]
