"""Multi-node: build-db and label on a two-raylet Ray cluster (ray.cluster_utils.Cluster, every node
bound to 127.0.0.1) into the local S3 server, against the same jobs on a single local node.

The head node (where the driver runs) gets no CPUs, so every task and actor runs on the second node:
the commit records must name that node and a pid other than the driver's (the pieces were written on
the workers, next to the data), and the outputs must equal the single-node run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster

from ragseg import ledger
from ragseg.config import load_config
from ragseg.index.build import build_index
from ragseg.pipelines.build_db import run_build_db
from ragseg.pipelines.label import run_label

tiny, syn, index, result = sys.argv[1:5]
MB = 1024 * 1024
common = ["ray.model_actors=1", "ray.images_per_block=2", "ray.progress=false"]
db_args = ["source.kind=synthetic", f"source.uri={syn}", "source.split=train", "source.limit=6",
           "build_db.masks=gt", "build_db.images_per_shard=2", "build_db.min_segment_area=0"]
lab_args = ["label.images.kind=synthetic", f"label.images.uri={syn}", "label.images.split=val", "label.images.limit=3",
            f"label.vocab={syn}/categories.json", f"label.index={index}", "label.proposals=gt",
            "label.images_per_shard=2", "label.ensemble.scores=retrieval"]
out = {"driver_pid": os.getpid()}

def two_nodes(suffix=""):
    # a head without CPUs (the driver's node) and a 2-CPU worker node, both on 127.0.0.1
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                           "object_store_memory": 150 * MB})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=150 * MB)
    ray.init(address=cluster.address)
    out["driver_node" + suffix] = ray.get_runtime_context().get_node_id()
    out["worker_node" + suffix] = worker.node_id
    return cluster


cluster = two_nodes()
out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
run_build_db(load_config(tiny, common + db_args + ["build_db.out=s3://multinode/db-multi"]))
ray.shutdown()
cluster.shutdown()

ray.init(address="local", num_cpus=2, object_store_memory=200 * MB, _node_ip_address="127.0.0.1",
         include_dashboard=False)
run_build_db(load_config(tiny, common + db_args + ["build_db.out=s3://multinode/db-single"]))
build_index("s3://multinode/db-single", load_config(tiny, [f"index.out={index}", "index.min_recall_at_10=0"]))
run_label(load_config(tiny, common + lab_args + ["label.out=s3://multinode/lab-single"]))
ray.shutdown()

cluster = two_nodes("_2")
run_label(load_config(tiny, common + lab_args + ["label.out=s3://multinode/lab-multi"]))
ray.shutdown()
cluster.shutdown()
json.dump(out, open(result, "w"))
"""


def _db_rows(uri: str):
    import pyarrow.parquet as pq

    from ragseg import io
    from ragseg.db import open_db
    from ragseg.schema import arrow_to_embeddings

    led = open_db(uri)
    fs, root = io.fs_and_path(uri)
    rows = {}
    for p in led.records.to_pylist():
        with fs.open(f"{root}/{p['data_path']}", "rb") as f:
            t = pq.read_table(f)
        emb = arrow_to_embeddings(t["embedding"])
        for j, (i, s, lab) in enumerate(zip(t["image_id"].to_pylist(), t["segment_id"].to_pylist(),
                                            t["label"].to_pylist())):
            rows[(i, s, lab)] = emb[j]
    return led, rows


def _labels(uri: str):
    from ragseg.labels_out import iter_images, open_labels

    anns = {a["image_id"]: [(s["id"], s["category_id"], s["area"]) for s in a["segments_info"]] for a in iter_images(uri)}
    return open_labels(uri), anns


def test_two_node_cluster_equals_single_node(s3_server, synthetic_root, tiny_cfg_path, tmp_path):
    import fsspec
    import numpy as np

    fs = fsspec.filesystem("s3")
    fs.mkdir("multinode")
    fs.put(synthetic_root.rstrip("/") + "/", "multinode/syn/", recursive=True)
    result = str(tmp_path / "result.json")
    env = {**os.environ, **s3_server, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # 127.0.0.1 stays 127.0.0.1 (see conftest)
    res = subprocess.run([sys.executable, "-c", SCRIPT, tiny_cfg_path, "s3://multinode/syn", str(tmp_path / "index"),
                          result], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.load(open(result))
    assert info["nodes"] == 2 and info["driver_node"] != info["worker_node"]
    fs.invalidate_cache()

    multi, rows_multi = _db_rows("s3://multinode/db-multi")
    single, rows_single = _db_rows("s3://multinode/db-single")
    assert rows_multi.keys() == rows_single.keys() and len(rows_multi) > 0
    for k, v in rows_multi.items():
        np.testing.assert_allclose(v, rows_single[k], atol=2e-3)
    for rec in multi.records.to_pylist():  # written on the second raylet's workers, not by the driver
        assert rec["node_id"] == info["worker_node"] and rec["pid"] != info["driver_pid"]

    lab_multi, anns_multi = _labels("s3://multinode/lab-multi")
    _, anns_single = _labels("s3://multinode/lab-single")
    assert anns_multi == anns_single and len(anns_multi) == 3
    for rec in lab_multi.records.to_pylist():
        assert rec["node_id"] == info["worker_node_2"] and rec["pid"] != info["driver_pid"]
    pngs = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find("multinode/lab-multi/panoptic")}
    pngs_single = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find("multinode/lab-single/panoptic")}
    assert pngs == pngs_single


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
