"""build-db end to end on the synthetic set with the tiny real models (Ray local, 2 CPUs)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from ragseg.config import load_config
from ragseg.errors import UserError
from ragseg.schema import arrow_to_embeddings


def _cfg(tiny_cfg_path, synthetic_root, out, *extra):
    return load_config(tiny_cfg_path, [
        "source.kind=synthetic", f"source.uri={synthetic_root}", "source.split=train",
        f"build_db.out={out}", "build_db.images_per_shard=6", "ray.images_per_block=3", *extra,
    ])


def _rows(db):
    """(header + totals, feature tables of the committed pieces), read through the ledger."""
    from ragseg.db import open_db

    led = open_db(db)
    m = {**led.header, "pieces": led.records.to_pylist()}
    tables = [pq.read_table(os.path.join(db, p["data_path"])) for p in m["pieces"]]
    return m, tables


def _gt_segments(synthetic_root, split="train"):
    """(image_id, label) multiset of the ground truth, through the same reader the DB used."""
    from ragseg.config import SourceConfig
    from ragseg.sources import list_rows

    rows = list_rows(SourceConfig(kind="synthetic", uri=synthetic_root, split=split))
    out = Counter()
    for r in rows:
        for s in json.loads(r["gt_segments"]):
            if not s.get("iscrowd"):
                out[(str(r["image_id"]), s["label"])] += 1
    return out, rows


@pytest.fixture(scope="module")
def gt_db(tmp_path_factory, tiny_cfg_path, synthetic_root, ray_local):
    from ragseg.pipelines.build_db import run_build_db

    out = str(tmp_path_factory.mktemp("db_gt"))
    summary = run_build_db(_cfg(tiny_cfg_path, synthetic_root, out, "build_db.masks=gt", "build_db.min_segment_area=0"))
    return out, summary


def test_gt_mode_rows_labels_norms(gt_db, synthetic_root):
    db, summary = gt_db
    m, tables = _rows(db)
    total = sum(t.num_rows for t in tables)
    assert total == summary["segments"] == sum(p["segments"] for p in m["pieces"]) > 0
    # the writer's identity is in every record; the pieces cover each image exactly once
    ids = [i for p in m["pieces"] for i in p["image_ids"]]
    assert len(ids) == len(set(ids)) == summary["images"]
    assert all(p["pid"] > 0 and p["host"] for p in m["pieces"])
    assert summary["errors"] == 0
    gt, rows = _gt_segments(synthetic_root)
    assert summary["images"] == len(rows)
    got = Counter()
    for t in tables:
        for iid, lab in zip(t["image_id"].to_pylist(), t["label"].to_pylist()):
            got[(iid, lab)] += 1
    assert got == gt  # labels in ground-truth mode are the ground truth, one row per segment
    emb = np.concatenate([arrow_to_embeddings(t["embedding"]) for t in tables])
    assert emb.shape == (total, m["dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    t = tables[0]
    assert set(t["label_source"].to_pylist()) == {"gt"}
    assert t.schema.field("embedding").type.value_type == pq.read_schema(os.path.join(db, m["pieces"][0]["data_path"])).field("embedding").type.value_type
    # ids unique within the DB
    keys = [(i, s) for tt in tables for i, s in zip(tt["image_id"].to_pylist(), tt["segment_id"].to_pylist())]
    assert len(keys) == len(set(keys))
    # the pending listing Ray Data read (ragseg.pipelines.listing) is gone once the job is done
    assert not os.path.exists(os.path.join(db, "_listing"))


def test_embed_identity_matches_stage(tiny_cfg):
    from ragseg.pipelines.build_db import embed_identity
    from ragseg.stages.embed import Embed

    e = Embed(tiny_cfg)
    assert embed_identity(tiny_cfg) == (e.model_id, e.mode, e.dim)


def test_rerun_is_noop_and_other_model_refused(gt_db, tiny_cfg_path, synthetic_root, ray_local):
    from ragseg.pipelines.build_db import run_build_db

    db, _ = gt_db
    before = _rows(db)[0]["pieces"]
    s = run_build_db(_cfg(tiny_cfg_path, synthetic_root, db, "build_db.masks=gt", "build_db.min_segment_area=0"))
    assert s["shards_written"] == 0 and s["images"] == 0
    assert _rows(db)[0]["pieces"] == before
    with pytest.raises(UserError, match="mode pool there vs crop here"):
        run_build_db(_cfg(tiny_cfg_path, synthetic_root, db, "models.clip.mode=crop"))


def test_detector_mode(tmp_path, tiny_cfg_path, synthetic_root, ray_local):
    from ragseg.pipelines.build_db import run_build_db

    out = str(tmp_path / "db_det")
    s = run_build_db(_cfg(tiny_cfg_path, synthetic_root, out, "build_db.masks=detector", "source.limit=6"))
    m, tables = _rows(out)
    assert s["images"] == 6 and s["errors"] == 0
    assert s["segments"] == sum(t.num_rows for t in tables) > 0
    labels = set().union(*(set(t["label"].to_pylist()) for t in tables))
    _, rows = _gt_segments(synthetic_root)
    prompt = set().union(*(set(r["labels"]) for r in rows[:6]))
    assert labels <= prompt  # detector labels come from the image-level labels used as the prompt
    assert set(tables[0]["label_source"].to_pylist()) == {"detector"}
    emb = np.concatenate([arrow_to_embeddings(t["embedding"]) for t in tables])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)


def test_corrupt_image_goes_to_errors(tmp_path, tiny_cfg_path, ray_local):
    from PIL import Image

    from ragseg.pipelines.build_db import run_build_db

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f"im{i}.jpg")
    data = (imgs / "im3.jpg").read_bytes()
    (imgs / "im3.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    out = str(tmp_path / "db")
    cfg = load_config(tiny_cfg_path, ["source.kind=folder", f"source.uri={imgs}", f"build_db.out={out}",
                                       "build_db.masks=detector", "build_db.images_per_shard=2"])
    s = run_build_db(cfg)
    assert s["images"] == 4 and s["errors"] == 1
    errs = pq.read_table(os.path.join(out, "errors")).to_pylist()
    assert len(errs) == 1 and errs[0]["uri"].endswith("im3.jpg") and errs[0]["stage"] == "decode"


KILL_SCRIPT = r"""
import sys
from ragseg.config import load_config
from ragseg.pipelines.build_db import run_build_db
cfg = load_config(sys.argv[1], sys.argv[2:])
run_build_db(cfg)
"""


def test_kill_and_rerun_equals_uninterrupted(tmp_path, tiny_cfg_path, synthetic_root, gt_db, ray_local,
                                             kill_after_first_shard):
    """SIGKILL the driver once the first shard is recorded, rerun: same rows as an uninterrupted run."""
    from ragseg.pipelines.build_db import run_build_db

    out = str(tmp_path / "db_kill")
    args = ["source.kind=synthetic", f"source.uri={synthetic_root}", "source.split=train",
            f"build_db.out={out}", "build_db.images_per_shard=3", "ray.images_per_block=3",
            "build_db.masks=gt", "build_db.min_segment_area=0", "ray.num_cpus=1"]
    assert kill_after_first_shard(["-c", KILL_SCRIPT, tiny_cfg_path, *args], out) >= 1
    run_build_db(load_config(tiny_cfg_path, args[:-1]))
    m, tables = _rows(out)
    got = Counter((i, s, lab) for t in tables for i, s, lab in
                  zip(t["image_id"].to_pylist(), t["segment_id"].to_pylist(), t["label"].to_pylist()))
    ref_db, _ = gt_db
    _, ref_tables = _rows(ref_db)
    want = Counter((i, s, lab) for t in ref_tables for i, s, lab in
                   zip(t["image_id"].to_pylist(), t["segment_id"].to_pylist(), t["label"].to_pylist()))
    assert got == want
    assert max(got.values()) == 1
