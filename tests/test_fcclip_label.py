"""label with FC-CLIP proposals (tiny random-weight model) end to end: synthetic DB (gt masks pooled the
FC-CLIP way, ``models.clip.mode: fcclip``, on the same tiny trunk) -> index -> label val with
``proposals: fcclip`` (one actor: network, retrieval, ensemble, Mask2Former merge) -> COCO panoptic files
that ``ragseg eval`` reads (random weights: the PQ value itself means nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ragseg.config import load_config
from ragseg.errors import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_cfg_path, ray_local):
    from conftest import build_world

    return build_world(tmp_path_factory, tiny_cfg_path, "fcclip_world", images=16, seed=2,
                       overrides=("models.clip.mode=fcclip",))


def _args(world, out, *extra):
    return ["label.images.kind=synthetic", f"label.images.uri={world['data']}", "label.images.split=val",
            f"label.vocab={world['syn']['categories']}", f"label.index={world['index']}", f"label.out={out}",
            "label.proposals=fcclip", "label.ensemble.form=geometric", "label.images_per_shard=2",
            "ray.images_per_block=2", *extra]


def test_label_with_fcclip_proposals_writes_coco_panoptic(world, tiny_cfg_path):
    from ragseg.pipelines.label import run_label

    out = str(world["root"] / "lab_fcclip")
    summary = run_label(load_config(tiny_cfg_path, _args(world, out)))
    val = world["syn"]["splits"]["val"]
    assert summary["images"] == val["count"] and summary["errors"] == 0
    doc = json.load(open(os.path.join(out, "panoptic.json")))
    assert len(doc["annotations"]) == val["count"]
    seg = pq.read_table(os.path.join(out, "segments"))
    assert seg.num_rows == sum(len(a["segments_info"]) for a in doc["annotations"]) > 0
    # every kept segment records all three sources and the final score
    for col in ("s_iv", "s_clip", "s_ret", "score"):
        vals = seg[col].to_pylist()
        assert all(v is not None and 0.0 <= v <= 1.0 for v in vals), col
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ragseg"), "eval",
                          "--gt-json", val["coco_json"], "--gt-dir", val["coco_dir"],
                          "--pred-json", os.path.join(out, "panoptic.json"),
                          "--pred-dir", os.path.join(out, "panoptic")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "PQ" in res.stdout


def test_label_fcclip_refuses_index_of_another_size(world, tiny_cfg_path, tmp_path):
    from ragseg.pipelines.label import run_label

    cfg = load_config(tiny_cfg_path, _args(world, str(tmp_path / "o"), "models.fcclip.min_size_test=320"))
    with pytest.raises(UserError, match=r"fcclip_input \[256, 427, 32\] there vs \[320, 427, 32\] here"):
        run_label(cfg)


def test_label_fcclip_without_retrieval_needs_no_index(world, tiny_cfg_path, tmp_path):
    """scores=clip is FC-CLIP alone (gamma 0): no index is read."""
    from ragseg.pipelines.label import run_label

    out = str(tmp_path / "noidx")
    args = [a for a in _args(world, out, "label.ensemble.scores=clip") if not a.startswith("label.index=")]
    summary = run_label(load_config(tiny_cfg_path, args))
    assert summary["errors"] == 0
    seg = pq.read_table(os.path.join(out, "segments"))
    assert seg.num_rows > 0 and all(v is None for v in seg["s_ret"].to_pylist())
