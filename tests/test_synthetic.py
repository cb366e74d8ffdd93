"""The synthetic panoptic set: layouts, determinism, scene properties."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ragseg.masks import rgb_to_id
from ragseg.sources.synthetic import BORDER, CLASSES, STUFF, THINGS, make_synthetic


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def test_every_layout_is_written(synthetic_root):
    root = Path(synthetic_root)
    cats = json.loads((root / "categories.json").read_text())
    assert len(cats) >= 12 and sum(c["isthing"] for c in cats) >= 8 and sum(not c["isthing"] for c in cats) >= 5
    assert len(THINGS) == 8 and len(STUFF) == 5
    for split, ade, n in (("train", "training", 18), ("val", "validation", 6)):
        coco = json.loads((root / "coco" / "annotations" / f"panoptic_{split}.json").read_text())
        assert len(coco["images"]) == len(coco["annotations"]) == n
        assert {c["name"] for c in coco["categories"]} == {c.name for c in CLASSES}
        for im, ann in zip(coco["images"], coco["annotations"]):
            assert (root / "coco" / split / im["file_name"]).is_file()
            assert (root / "coco" / "annotations" / f"panoptic_{split}" / ann["file_name"]).is_file()
            assert (root / "ADEChallengeData2016" / "images" / ade / im["file_name"]).is_file()
            assert (root / "ADEChallengeData2016" / "annotations" / ade / ann["file_name"]).is_file()
            assert (root / "ADEChallengeData2016" / f"ade20k_panoptic_{split}" / ann["file_name"]).is_file()
            assert (root / "openimages" / "images" / split / im["file_name"]).is_file()
            for s in ann["segments_info"]:
                assert set(s) >= {"id", "category_id", "area", "bbox", "iscrowd"}
        ade_json = json.loads((root / "ADEChallengeData2016" / f"ade20k_panoptic_{split}.json").read_text())
        assert all(isinstance(im["id"], str) for im in ade_json["images"])
        for name in (f"oidv7-{split}-annotations-human-imagelabels.csv", f"oidv7-{split}-annotations-bbox.csv",
                     f"{split}-annotations-object-segmentation.csv", f"{split}-images-with-rotation.csv"):
            assert (root / "openimages" / name).is_file()
    # the class list as ADEChallengeData2016.zip ships it: tab-separated objectInfo150.txt, names as
    # comma-separated synonyms
    lines = (root / "ADEChallengeData2016" / "objectInfo150.txt").read_text().splitlines()
    assert lines[0] == "Idx\tRatio\tTrain\tVal\tName"
    assert any(ln.split("\t")[4] == "road, route" for ln in lines[1:])
    assert not (root / "ADEChallengeData2016" / "objectInfo150.csv").exists()
    seg_head = (root / "openimages" / "train-annotations-object-segmentation.csv").read_text().splitlines()[0]
    assert seg_head == "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_synthetic(str(tmp_path / "a"), images=5, seed=3, size=48, val_fraction=0.4)
    make_synthetic(str(tmp_path / "b"), images=5, seed=3, size=48, val_fraction=0.4)
    make_synthetic(str(tmp_path / "c"), images=5, seed=4, size=48, val_fraction=0.4)
    fa, fb, fc = _files(str(tmp_path / "a")), _files(str(tmp_path / "b")), _files(str(tmp_path / "c"))
    assert fa == fb
    assert fa["coco/train/syn_000000.jpg"] != fc["coco/train/syn_000000.jpg"]
    assert a["splits"]["train"]["count"] == 3 and a["splits"]["val"]["count"] == 2
    for split in a["splits"].values():
        for key in ("images", "coco_json", "coco_dir", "ade_panoptic_json", "oi_segmentations", "oi_masks"):
            assert os.path.exists(split[key]), key


def test_scene_properties(synthetic_root):
    root = Path(synthetic_root)
    coco = json.loads((root / "coco" / "annotations" / "panoptic_train.json").read_text())
    thing_ids = {c.id for c in THINGS}
    repeated = occluded = 0
    for im, ann in zip(coco["images"], coco["annotations"]):
        png = np.asarray(Image.open(root / "coco" / "annotations" / "panoptic_train" / ann["file_name"]))
        ids = rgb_to_id(png)
        assert ids.shape == (im["height"], im["width"]) == (96, 96)
        # void border, and every listed segment is exactly its visible pixels
        assert (ids[:BORDER] == 0).all() and (ids[:, -BORDER:] == 0).all()
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert int((ids == s["id"]).sum()) == s["area"] >= 12
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        stuff = [s for s in ann["segments_info"] if s["category_id"] not in thing_ids]
        assert 1 <= len(stuff) <= 3 and len(things) <= 6
        assert len({s["category_id"] for s in stuff}) == len(stuff)
        repeated += len({s["category_id"] for s in things}) < len(things)
    boxes = (root / "openimages" / "oidv7-train-annotations-bbox.csv").read_text().splitlines()[1:]
    occluded = sum(line.split(",")[8] == "1" for line in boxes)
    assert repeated >= 1 and occluded >= 1
    img = np.asarray(Image.open(root / "coco" / "train" / coco["images"][0]["file_name"]))
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8


def test_classes_are_separable_by_simple_features(synthetic_root):
    """Colour statistics alone (nearest class centroid, train -> val) already separate the classes."""
    root = Path(synthetic_root)

    def feats(split):
        coco = json.loads((root / "coco" / "annotations" / f"panoptic_{split}.json").read_text())
        X, y = [], []
        for im, ann in zip(coco["images"], coco["annotations"]):
            img = np.asarray(Image.open(root / "coco" / split / im["file_name"]), dtype=np.float32)
            ids = rgb_to_id(np.asarray(Image.open(root / "coco" / "annotations" / f"panoptic_{split}"
                                                  / ann["file_name"])))
            for s in ann["segments_info"]:
                px = img[ids == s["id"]]
                X.append(np.concatenate([px.mean(0), px.std(0)]))
                y.append(s["category_id"])
        return np.array(X), np.array(y)

    Xt, yt = feats("train")
    Xv, yv = feats("val")
    classes = sorted(set(yt))
    cent = np.stack([Xt[yt == c].mean(0) for c in classes])
    pred = np.array(classes)[np.argmin(((Xv[:, None] - cent[None]) ** 2).sum(-1), axis=1)]
    assert (pred == yv).mean() >= 0.8


def test_cli_make_synthetic(tmp_path):
    from typer.testing import CliRunner

    from ragseg.jobs.cli import app

    res = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "s"), "--images", "4",
                                   "--seed", "1", "--size", "48"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["splits"]["train"]["count"] + out["splits"]["val"]["count"] == 4
    assert os.path.exists(out["categories"])


@pytest.mark.parametrize("kwargs", [{"images": 0}, {"size": 8}, {"val_fraction": 1.0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic(str(tmp_path / "x"), **kwargs)
