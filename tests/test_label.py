"""label end to end: synthetic DB (train, gt masks) -> index -> label val -> PQ from the written files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ragseg.config import load_config
from ragseg.errors import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_cfg_path, ray_local):
    """A bigger synthetic set than the session one, so that retrieval has enough keys per class."""
    from conftest import build_world

    return build_world(tmp_path_factory, tiny_cfg_path, "label_world", images=40, seed=1)


def _label_args(world, out, *extra):
    return ["label.images.kind=synthetic", f"label.images.uri={world['data']}", "label.images.split=val",
            f"label.vocab={world['syn']['categories']}", f"label.index={world['index']}", f"label.out={out}",
            "label.proposals=gt", "label.images_per_shard=3", "ray.images_per_block=3", *extra]


def _pq(world, out):
    from ragseg.eval.pq import evaluate

    val = world["syn"]["splits"]["val"]
    return evaluate(val["coco_json"], val["coco_dir"], os.path.join(out, "panoptic.json"), os.path.join(out, "panoptic"))


def _tree_digest(out):
    """The output's content, independent of how images were grouped into pieces: every PNG's bytes,
    the multiset of segment rows and of part lines, and panoptic.json with its lists sorted."""
    from ragseg.labels_out import iter_images

    h = {}
    d = os.path.join(out, "panoptic")
    for f in sorted(os.listdir(d)):
        if ".tmp-" not in f:
            h[f"panoptic/{f}"] = hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
    seg = pq.read_table(os.path.join(out, "segments")).to_pylist()
    h["segments"] = sorted(json.dumps(r, sort_keys=True, default=str) for r in seg)  # mask counts are bytes
    h["parts"] = sorted(json.dumps(a, sort_keys=True) for a in iter_images(out))
    doc = json.load(open(os.path.join(out, "panoptic.json")))
    doc["info"].pop("provenance", None)  # what made it (the run that started the folder), not its content
    for k in ("images", "annotations"):
        doc[k] = sorted(doc[k], key=lambda a: str(a.get("id", a.get("image_id"))))
    h["panoptic.json"] = doc
    return h


@pytest.fixture(scope="module")
def retrieval_run(world, tiny_cfg_path):
    from ragseg.pipelines.label import run_label

    out = str(world["root"] / "lab_ret")
    run_label(load_config(tiny_cfg_path, _label_args(world, out, "label.ensemble.scores=retrieval")))
    return out


def test_retrieval_beats_clip_with_random_weights(world, retrieval_run, tiny_cfg_path):
    from ragseg.pipelines.label import run_label

    ret = _pq(world, retrieval_run)
    out_clip = str(world["root"] / "lab_clip")
    run_label(load_config(tiny_cfg_path, _label_args(world, out_clip, "label.ensemble.scores=clip")))
    clip = _pq(world, out_clip)
    n_classes = len(world["syn"]["classes"])
    assert ret["All"]["pq"] >= 60.0, ret["All"]
    # CLIP text side of a random-weight model carries no signal: near chance (1 / n_classes)
    assert clip["All"]["pq"] <= 100.0 * 3 / n_classes + 10.0, clip["All"]
    assert ret["All"]["pq"] > clip["All"]["pq"] + 30.0


def test_outputs_schema_and_cli_eval(world, retrieval_run):
    doc = json.load(open(os.path.join(retrieval_run, "panoptic.json")))
    assert {c["name"] for c in doc["categories"]} == set(world["syn"]["classes"])
    assert len(doc["annotations"]) == world["syn"]["splits"]["val"]["count"]
    seg = pq.read_table(os.path.join(retrieval_run, "segments"))
    assert {"s_ret", "s_clip", "s_iv", "score", "mask_rle", "box", "area", "category_id"} <= set(seg.column_names)
    assert seg.num_rows == sum(len(a["segments_info"]) for a in doc["annotations"])
    assert all(v is None for v in seg["s_iv"].to_pylist())
    val = world["syn"]["splits"]["val"]
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ragseg"), "eval",
                          "--gt-json", val["coco_json"], "--gt-dir", val["coco_dir"],
                          "--pred-json", os.path.join(retrieval_run, "panoptic.json"),
                          "--pred-dir", os.path.join(retrieval_run, "panoptic")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "PQ" in res.stdout


def test_ids_types_and_file_names_match_the_source_gt(world, retrieval_run):
    """Issue 12 item 5 (COCO panoptic format, cocodataset.org/#format-data): the images' ids keep the
    gt JSON's type (COCO numbers them), their file_names are the gt's, and each annotation's file_name
    is the PNG that the gt names the same way, so COCO tools pair prediction and gt."""
    val = world["syn"]["splits"]["val"]
    gt = json.load(open(val["coco_json"]))
    doc = json.load(open(os.path.join(retrieval_run, "panoptic.json")))
    gt_images = {im["id"]: im for im in gt["images"]}
    assert {im["id"] for im in doc["images"]} == set(gt_images)
    assert all(isinstance(im["id"], int) for im in doc["images"])
    for im in doc["images"]:
        assert im["file_name"] == gt_images[im["id"]]["file_name"]
    gt_png = {a["image_id"]: a["file_name"] for a in gt["annotations"]}
    assert {a["image_id"]: a["file_name"] for a in doc["annotations"]} == gt_png
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    assert {c["id"]: c["name"] for c in doc["categories"]} == cats  # a COCO vocabulary keeps its ids


def test_eval_reads_the_parts_without_panoptic_json(world, retrieval_run, tmp_path):
    """label.panoptic_json=never writes no merged file; eval and the Python reader use the parts."""
    import shutil

    from ragseg.eval.pq import evaluate
    from ragseg.labels_out import iter_images

    out = str(tmp_path / "copy")
    shutil.copytree(retrieval_run, out)
    os.remove(os.path.join(out, "panoptic.json"))
    val = world["syn"]["splits"]["val"]
    res = evaluate(val["coco_json"], val["coco_dir"], out)
    assert res["All"]["pq"] == _pq(world, retrieval_run)["All"]["pq"]
    assert len(list(iter_images(out))) == val["count"]


def test_rerun_skips_done_and_kill_rerun_identical(world, retrieval_run, tiny_cfg_path, kill_after_first_shard):
    from ragseg.pipelines.label import run_label

    ref = _tree_digest(retrieval_run)
    s = run_label(load_config(tiny_cfg_path, _label_args(world, retrieval_run, "label.ensemble.scores=retrieval")))
    assert s["images"] == 0 and _tree_digest(retrieval_run) == ref

    out = str(world["root"] / "lab_kill")
    args = _label_args(world, out, "label.ensemble.scores=retrieval")
    script = ("import sys\nfrom ragseg.config import load_config\nfrom ragseg.pipelines.label import run_label\n"
              "run_label(load_config(sys.argv[1], sys.argv[2:]))\n")
    kill_after_first_shard(["-c", script, tiny_cfg_path, *args, "ray.num_cpus=1"], out)
    run_label(load_config(tiny_cfg_path, args))
    got = _tree_digest(out)
    assert got.keys() == ref.keys()
    assert got == ref


def test_query_index_model_mismatch_refused(world, tiny_cfg_path, tmp_path):
    from ragseg.pipelines.label import run_label

    cfg = load_config(tiny_cfg_path, _label_args(world, str(tmp_path / "x"), "models.clip.mode=crop"))
    with pytest.raises(UserError, match="mode pool there vs crop here"):
        run_label(cfg)
    assert not os.path.exists(tmp_path / "x")


def _filtered_db(src: str, dst: str, drop: set[str]) -> None:
    """A copy of a feature DB without the segments of some classes (real Parquet, committed pieces)."""
    import pyarrow.compute as pc

    from ragseg.db import open_db, write_db

    led = open_db(src)
    pieces = {}
    for p in led.records.to_pylist():
        t = pq.read_table(os.path.join(src, p["data_path"]))
        pieces[p["name"]] = t.filter(pc.invert(pc.is_in(t["label"].cast("string"), value_set=pa.array(sorted(drop)))))
    write_db(dst, int(led.header["dim"]), pieces, led.header["embed_model"], led.header["embed_mode"])


def test_fallback_index_covers_classes_missing_from_primary(world, tiny_cfg_path):
    """METHOD.md stage 6: vocabulary classes absent from the primary DB are retrieved from the fallback."""
    from ragseg.index.build import build_index
    from ragseg.pipelines.label import run_label

    drop = {"sky", "ball"}
    db, index = str(world["root"] / "db_primary"), str(world["root"] / "index_primary")
    _filtered_db(world["db"], db, drop)
    build_index(db, load_config(tiny_cfg_path, [f"index.out={index}", "index.min_recall_at_10=0"]))

    def pq_of(out, *extra):
        args = _label_args(world, out, "label.ensemble.scores=retrieval", *extra)
        args = [a if not a.startswith("label.index=") else f"label.index={index}" for a in args]
        run_label(load_config(tiny_cfg_path, args))
        return {c["name"]: c for c in _pq(world, out)["per_class"]}

    without = pq_of(str(world["root"] / "lab_primary_only"))
    with_fb = pq_of(str(world["root"] / "lab_fallback"), f"label.fallback_index={world['index']}")
    assert any(without[name]["present"] for name in drop)
    for name in drop:
        if without[name]["present"]:
            assert without[name]["tp"] == 0  # never predicted: the primary DB has no such key
            assert with_fb[name]["tp"] > 0, with_fb[name]


def test_search_region_with_the_real_embedder(world, tiny_cfg_path):
    """`ragseg search`: a box of a val image, embedded by the tiny real CLIP, against the real index."""
    from ragseg.index.search import search_region

    images = sorted(os.listdir(world["syn"]["splits"]["val"]["images"]))
    img = os.path.join(world["syn"]["splits"]["val"]["images"], images[0])
    hits = search_region(world["index"], img, box="8,8,60,60", k=3, cfg=load_config(tiny_cfg_path))
    assert len(hits) == 3
    assert all(h["label"] in world["syn"]["classes"] for h in hits)
    assert hits[0]["sim"] >= hits[1]["sim"] >= hits[2]["sim"]
    with pytest.raises(UserError, match="mode"):
        search_region(world["index"], img, box="8,8,60,60", k=3,
                      cfg=load_config(tiny_cfg_path, ["models.clip.mode=crop"]))
