"""SAM 2.1 (models.sam.family: sam2, tiny random weights) end to end: a tiny build-db with detector
masks and a tiny label with gdino-sam proposals; the DB records its mask model and warns when a run
adds masks of another one."""

from __future__ import annotations

import logging
import os

import pyarrow.parquet as pq
import pytest

from ragseg.config import load_config

pytest.importorskip("sam2")

SAM2 = ["models.sam.family=sam2", "models.sam.encoder_batch=2"]


def _db_cfg(tiny_cfg_path, synthetic_root, out, *extra):
    return load_config(tiny_cfg_path, [
        "source.kind=synthetic", f"source.uri={synthetic_root}", "source.split=train",
        f"build_db.out={out}", "build_db.masks=detector", "build_db.images_per_shard=2",
        "ray.images_per_block=2", *extra])


def test_sam2_build_db_records_mask_model_and_warns_on_mixing(tmp_path, tiny_cfg_path, synthetic_root,
                                                              ray_local, caplog):
    from ragseg.db import open_db
    from ragseg.pipelines.build_db import run_build_db

    out = str(tmp_path / "db_sam2")
    s = run_build_db(_db_cfg(tiny_cfg_path, synthetic_root, out, *SAM2, "source.limit=4"))
    assert s["images"] == 4 and s["errors"] == 0 and s["segments"] > 0
    assert s["mask_model"] == "sam2.1:custom:random-seed0" and "warnings" not in s
    led = open_db(out)
    h = led.header
    assert h["mask_model"] == "sam2.1:custom:random-seed0" and h["mask_models"] == [h["mask_model"]]
    assert h["runs"][-1]["mask_model"] == h["mask_model"]
    assert h["models"]["sam"]["family"] == "sam2"
    tables = [pq.read_table(os.path.join(out, p)) for p in led.records.column("data_path").to_pylist()]
    assert sum(t.num_rows for t in tables) == s["segments"]
    assert set(tables[0]["label_source"].to_pylist()) == {"detector"}
    assert "segment" in s["stages"] and "sam_prep" not in s["stages"]  # SAM 2.1 resizes on its device

    # the same DB, two more images with segment_anything's SAM: allowed, recorded, warned about
    with caplog.at_level(logging.WARNING, logger="ragseg.pipelines.build_db"):
        s2 = run_build_db(_db_cfg(tiny_cfg_path, synthetic_root, out, "source.limit=6"))
    assert s2["images"] == 2 and s2["mask_model"] == "sam:custom:random-seed0"
    assert len(s2["warnings"]) == 1 and "mixes mask models" in s2["warnings"][0]
    assert any("mixes mask models" in r.getMessage() for r in caplog.records)
    assert "sam_prep" in s2["stages"]
    h = open_db(out).header
    assert h["mask_model"] == "sam2.1:custom:random-seed0"  # the first
    assert h["mask_models"] == ["sam2.1:custom:random-seed0", "sam:custom:random-seed0"]
    assert [r["mask_model"] for r in h["runs"]] == h["mask_models"]


def test_sam2_label_gdino_sam(tmp_path_factory, tiny_cfg_path, ray_local):
    from conftest import build_world

    from ragseg.config import SourceConfig
    from ragseg.labels_out import iter_images
    from ragseg.pipelines.label import run_label
    from ragseg.sources import list_rows

    world = build_world(tmp_path_factory, tiny_cfg_path, "sam2_world", images=12, seed=2)
    out = str(world["root"] / "lab_sam2")
    cfg = load_config(tiny_cfg_path, [
        "label.images.kind=synthetic", f"label.images.uri={world['data']}", "label.images.split=val",
        f"label.vocab={world['syn']['categories']}", f"label.index={world['index']}", f"label.out={out}",
        "label.proposals=gdino-sam", "label.images_per_shard=2", "ray.images_per_block=2", *SAM2])
    s = run_label(cfg)
    n_val = len(list_rows(SourceConfig(kind="synthetic", uri=world["data"], split="val")))
    assert s["errors"] == 0 and s["images"] == n_val > 0
    assert "segment" in s["stages"] and "detect" in s["stages"]
    images = list(iter_images(out))
    assert len(images) == s["images"]
    segs = pq.read_table(os.path.join(out, "segments")).num_rows
    assert segs == s["segments"] == sum(len(a["segments_info"]) for a in images) > 0
    assert os.path.exists(os.path.join(out, "panoptic.json"))
